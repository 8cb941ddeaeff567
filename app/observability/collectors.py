"""Metrics read at scrape time: from the database (jobs, the queue, running jobs) and from the API
process's handle on the inference process.

Labels stay few: `status` (five values) and, for running jobs only, `job_id` (at most one per
worker slot at a time).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy.orm import Session

from app.inference import model_server
from app.jobs.stats import job_stats
from app.observability.metrics import PREFIX
from app.settings import Settings


def job_metrics(session: Session) -> Iterator[Metric]:
    """Jobs by status, queue depth and age, and each running job's heartbeat age and images/s."""
    stats = job_stats(session)
    jobs = GaugeMetricFamily(PREFIX + "jobs", "Jobs by status.", labels=["status"])
    for status, count in stats.by_status.items():
        jobs.add_metric([status], count)
    yield jobs
    yield GaugeMetricFamily(PREFIX + "queue_depth", "Jobs queued, waiting for a worker.", value=stats.queued)
    yield GaugeMetricFamily(
        PREFIX + "queue_oldest_age_seconds",
        "How long the job queued longest has waited since it was last queued (0 when none is).",
        value=stats.oldest_queued_seconds,
    )
    heartbeat = GaugeMetricFamily(
        PREFIX + "running_job_heartbeat_age_seconds",
        "Seconds since a running job's worker last renewed its lease or reported progress (database "
        "clock); a lease not renewed for SGJOBS_LEASE_SECONDS is lost.",
        labels=["job_id"],
    )
    throughput = GaugeMetricFamily(
        PREFIX + "training_images_per_second",
        "A running job's training throughput: the mean of its latest per-batch images/s.",
        labels=["job_id"],
    )
    for job in stats.running:
        if job.heartbeat_age_seconds is not None:
            heartbeat.add_metric([job.job_id], job.heartbeat_age_seconds)
        if job.images_per_second is not None:
            throughput.add_metric([job.job_id], job.images_per_second)
    yield heartbeat
    yield throughput


def inference_metrics(settings: Settings) -> Iterator[Metric]:
    """The inference process's state as this API process's handle knows it (never asks the process,
    which may be busy predicting)."""
    server = model_server(settings)
    yield GaugeMetricFamily(
        PREFIX + "inference_process_up",
        "1 while this API process's inference process runs.",
        value=0 if server.pid is None else 1,
    )
    yield CounterMetricFamily(
        PREFIX + "inference_process_starts",
        "Inference processes this API process started (the first /predict, and after each crash).",
        value=server.starts,
    )
