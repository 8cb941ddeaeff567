"""The API process's Prometheus registry and the instruments the request path records into.

One registry of our own, not prometheus-client's global one: the global one carries `process_*`
and `python_*` collectors, and every name GET /metrics shows starts with `sgjobs_`. Counters and
histograms here count what this process served (Prometheus scrapes each API process as a target of
its own); what the database knows (jobs, the queue) is read at scrape time by `collectors`, so every
process answers the same.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

PREFIX = "sgjobs_"
# The text format has no place for a series' creation time: prometheus-client would write it as one
# more gauge per series (`*_created`). Nothing else in the API process uses prometheus-client.
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)

# Request latency up to the slow end of the API: uploads and a /predict that loads a model.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

REQUEST_SECONDS = Histogram(
    PREFIX + "http_request_duration_seconds",
    "Time to answer an HTTP request, to the end of its body, by route template (`/jobs/{job_id}`; "
    "`unmatched` for a path no route has), method and status class (2xx, 4xx, ...).",
    ["route", "method", "status"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
PREDICT_SECONDS = Histogram(
    PREFIX + "predict_duration_seconds",
    "Time of a successful prediction: checking and decoding the images and the inference process's "
    "answer, a model load included.",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
PREDICT_INFERENCE_SECONDS = Histogram(
    PREFIX + "predict_inference_seconds",
    "Time in the model pipeline of a successful prediction (preprocess, forward, NMS): the "
    "`inference_ms` /predict answers.",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
MODEL_CACHE_HITS = Counter(
    PREFIX + "predict_model_cache_hits",
    "Predictions whose model the inference process already held.",
    registry=REGISTRY,
)
MODEL_CACHE_MISSES = Counter(
    PREFIX + "predict_model_cache_misses",
    "Predictions that loaded their model's checkpoint first.",
    registry=REGISTRY,
)


def record_prediction(*, seconds: float, inference_seconds: float, cached: bool) -> None:
    """A successful prediction: its time, its time in the model, and whether its model was held."""
    PREDICT_SECONDS.observe(seconds)
    PREDICT_INFERENCE_SECONDS.observe(inference_seconds)
    (MODEL_CACHE_HITS if cached else MODEL_CACHE_MISSES).inc()
