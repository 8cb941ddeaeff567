"""GET /metrics through the real HTTP API of `sgjobs serve` (both backends): the Prometheus text format,
every name prefixed `sgjobs_`, what it counts, and who may read it.

Jobs in a given state are inserted directly, on a dataset whose annotations are broken (a job a
worker picks up anyway fails at once) and marked as sent far in the future (no sweeper sends them);
they are failed afterwards so no worker ever trains them.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import update

from app.db import session_scope, utcnow
from app.jobs import lifecycle
from app.jobs.models import Job, JobEvent, JobStatus
from app.jobs.stats import THROUGHPUT_BATCHES
from app.ml.types import IMAGES_PER_SECOND, MetricPoint
from app.settings import Settings
from tests.auth.helpers import client_for, make_key
from tests.prediction.helpers import encode, scene
from tests.support import Service, insert_job, make_unreadable_dataset
from tests.weights.test_router import upload

PREFIX = "sgjobs_"
NEVER = timedelta(days=365)
LATENCY = "sgjobs_http_request_duration_seconds"
# Every family the endpoint documents (counters without their `_total`, as the parser names them).
FAMILIES = {
    "sgjobs_jobs",
    "sgjobs_queue_depth",
    "sgjobs_queue_oldest_age_seconds",
    "sgjobs_running_job_heartbeat_age_seconds",
    "sgjobs_training_images_per_second",
    LATENCY,
    "sgjobs_predict_duration_seconds",
    "sgjobs_predict_inference_seconds",
    "sgjobs_predict_model_cache_hits",
    "sgjobs_predict_model_cache_misses",
    "sgjobs_inference_process_up",
    "sgjobs_inference_process_starts",
}


def scrape(client: httpx.Client) -> list[Sample]:
    """Every sample of one scrape, after checking the answer is the Prometheus text format."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4"), response.headers
    return [sample for family in text_string_to_metric_families(response.text) for sample in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The value of the one sample named `name` whose labels include `labels`; 0 when there is none
    (a labelled series appears with its first observation)."""
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else 0.0


@pytest.fixture(scope="module")
def dataset(service: Service) -> str:
    return make_unreadable_dataset(service.datasets_dir, "metrics-bad")


def test_every_name_is_prefixed_and_every_family_is_there(service: Service) -> None:
    response = service.client.get("/metrics")
    assert response.status_code == 200, response.text
    for line in response.text.splitlines():
        if line.startswith("#"):
            kind, name = line.split()[1:3]
            assert kind in ("HELP", "TYPE") and name.startswith(PREFIX), line
        elif line:
            assert line.startswith(PREFIX), line
    families = list(text_string_to_metric_families(response.text))
    assert all(f.name.startswith(PREFIX) for f in families)
    assert all(s.name.startswith(PREFIX) for f in families for s in f.samples)
    assert FAMILIES <= {f.name for f in families}
    # Every status is counted, zeros included.
    samples = [s for f in families for s in f.samples]
    statuses = {s.labels["status"] for s in samples if s.name == "sgjobs_jobs"}
    assert statuses == {status.value for status in JobStatus}


def _set_status(settings: Settings, job_id: str, status: JobStatus) -> None:
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=status))


def test_a_queued_job_is_counted_with_the_time_since_it_was_last_queued(
    service: Service, service_settings: Settings, dataset: str, stop_later: list[str]
) -> None:
    job_id = insert_job(service_settings, dataset, status=JobStatus.cancelled, enqueued_at=utcnow() + NEVER)
    stop_later.append(job_id)
    # Submitted two days ago, queued again (resumed) an hour ago: it has waited an hour.
    long_ago, an_hour_ago = utcnow() - timedelta(days=2), utcnow() - timedelta(hours=1)
    with session_scope(service_settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(created_at=long_ago))
        session.execute(update(JobEvent).where(JobEvent.job_id == job_id).values(time=long_ago))
        lifecycle.add_event(session, job_id=job_id, kind="state", message="resumed", time=an_hour_ago)
    # The job goes into the queue between two scrapes. Another test's job may move meanwhile (the
    # service's worker claims what it is sent): then the job leaves the queue and goes in again.
    for _ in range(5):
        before = scrape(service.client)
        _set_status(service_settings, job_id, JobStatus.queued)
        after = scrape(service.client)
        queued = [value(s, "sgjobs_jobs", status="queued") for s in (before, after)]
        if queued[1] == queued[0] + 1:
            break
        _set_status(service_settings, job_id, JobStatus.cancelled)
    assert queued[1] == queued[0] + 1, queued
    assert value(after, "sgjobs_queue_depth") == value(before, "sgjobs_queue_depth") + 1
    # The oldest wait is at least this job's; no job of this session waited two days.
    oldest = value(after, "sgjobs_queue_oldest_age_seconds")
    assert 3600 <= oldest < 2 * 86400, oldest


def test_running_jobs_show_their_heartbeat_age_and_images_per_second(
    service: Service, service_settings: Settings, dataset: str, stop_later: list[str]
) -> None:
    job_id = insert_job(
        service_settings, dataset, status="running", heartbeat_at=utcnow() - timedelta(seconds=42)
    )
    stop_later.append(job_id)
    # More per-batch points than the gauge averages: it reads the latest ones.
    rates = [float(i) for i in range(1, THROUGHPUT_BATCHES + 3)]
    points = [MetricPoint(IMAGES_PER_SECOND, rate, epoch=0, step=i) for i, rate in enumerate(rates)]
    with session_scope(service_settings.database_url) as session:
        lifecycle.add_metrics(session, job_id=job_id, points=points)
    samples = scrape(service.client)
    assert value(samples, "sgjobs_jobs", status="running") >= 1
    age = value(samples, "sgjobs_running_job_heartbeat_age_seconds", job_id=job_id)
    assert 42 <= age < 42 + 60, age
    latest = rates[-THROUGHPUT_BATCHES:]
    throughput = value(samples, "sgjobs_training_images_per_second", job_id=job_id)
    assert throughput == pytest.approx(sum(latest) / len(latest))
    # Finished jobs are not running jobs: their series go.
    with session_scope(service_settings.database_url) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(status=JobStatus.failed, finished_at=utcnow())
        )
    gone = scrape(service.client)
    assert not [s for s in gone if s.labels.get("job_id") == job_id]


def test_request_latency_is_counted_by_route_template(service: Service) -> None:
    missing = uuid.uuid4().hex
    count = LATENCY + "_count"
    template = {"route": "/jobs/{job_id}", "method": "GET", "status": "4xx"}
    unmatched = {"route": "unmatched", "method": "GET", "status": "4xx"}
    # A route of Starlette's own (the document), not an API route.
    document = {"route": "/openapi.json", "method": "GET", "status": "2xx"}
    before = scrape(service.client)
    assert service.client.get(f"/jobs/{missing}").status_code == 404
    assert service.client.get(f"/no-such-route/{missing}").status_code == 404
    assert service.client.get("/openapi.json").status_code == 200
    after = scrape(service.client)
    assert value(after, count, **template) == value(before, count, **template) + 1
    assert value(after, count, **unmatched) == value(before, count, **unmatched) + 1
    assert value(after, count, **document) == value(before, count, **document) + 1
    assert value(after, LATENCY + "_sum", **template) > value(before, LATENCY + "_sum", **template)
    # The request's own path (and its id) is never a label.
    assert not [s for s in after if any(missing in v for v in s.labels.values())]
    # The scrapes themselves are timed too, on their route.
    assert value(after, count, route="/metrics", method="GET", status="2xx") >= 1


def test_only_admin_keys_may_scrape(service: Service, service_settings: Settings) -> None:
    with client_for(service, make_key(service_settings, "metrics-team")) as member:
        refused = member.get("/metrics")
        assert refused.status_code == 403, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert "admin key" in refused.json()["detail"]
    with client_for(service, None) as anonymous:
        unauthenticated = anonymous.get("/metrics")
        assert unauthenticated.status_code == 401, unauthenticated.text
        assert unauthenticated.headers["www-authenticate"].startswith("Bearer")
    # Any tenant's admin key may.
    with client_for(service, make_key(service_settings, "metrics-ops", admin=True)) as admin:
        assert scrape(admin)


@pytest.mark.slow  # starts the inference process and loads a model (seconds on a CPU)
@pytest.mark.backends("sqlite")
def test_predictions_move_the_predict_latency_and_model_cache_counters(
    service: Service, standins: Path
) -> None:
    weights = upload(service, standins / "s5_named.pth")
    assert weights.status_code in (200, 201), weights.text
    before = scrape(service.client)
    answers = []
    for seed in (1, 2):
        response = service.client.post(
            "/predict",
            data={"weights_id": weights.json()["id"]},
            files=[("files", ("scene.png", encode(scene(64, 64, seed=seed)), "image/png"))],
            timeout=300,
        )
        assert response.status_code == 200, response.text
        answers.append(response.json())
    after = scrape(service.client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("sgjobs_predict_duration_seconds_count") == 2
    assert moved("sgjobs_predict_inference_seconds_count") == 2
    inference = sum(answer["inference_ms"] for answer in answers) / 1000
    assert moved("sgjobs_predict_inference_seconds_sum") == pytest.approx(inference, abs=0.01)
    assert moved("sgjobs_predict_duration_seconds_sum") >= inference - 0.01
    # Hits and misses are what the inference process said of each request; the second one is held.
    hits = sum(answer["cached"] for answer in answers)
    assert answers[1]["cached"] is True
    assert moved("sgjobs_predict_model_cache_hits_total") == hits
    assert moved("sgjobs_predict_model_cache_misses_total") == 2 - hits
    assert value(after, "sgjobs_inference_process_up") == 1
    assert value(after, "sgjobs_inference_process_starts_total") >= 1
    predict_route = {"route": "/predict", "method": "POST", "status": "2xx"}
    assert moved(LATENCY + "_count", **predict_route) == 2
