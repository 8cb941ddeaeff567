"""The outbox on a fresh database of each backend: one message per final status, written with it;
claims that one sender wins; a lapsed claim taken over; the sender's HTTP behaviour."""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from app.db import get_engine, session_scope, utcnow
from app.jobs import lifecycle
from app.jobs.models import FailureReason, Job, JobEvent, JobStatus
from app.migrate import upgrade
from app.settings import Settings
from app.testing import backend_resources
from app.webhooks import outbox, targets
from app.webhooks.models import DeliveryState, WebhookDelivery
from app.webhooks.sender import Sender
from tests.conftest import PG_ADMIN_URL, REDIS_URL
from tests.webhooks.conftest import verified
from tests.webhooks.receiver import Receiver


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    def make(url: str) -> Settings:
        upgrade(url)
        return Settings(
            home=tmp_path / "home",
            database_url=url,
            webhook_allowed_hosts=["127.0.0.1"],
            webhook_backoff_seconds=0.2,
            webhook_max_attempts=3,
            webhook_timeout_seconds=5,
            public_url="https://sgjobs.example.com/",
        )

    if request.param == "sqlite":
        yield make(f"sqlite:///{tmp_path / 'outbox.db'}")
        return
    with backend_resources(
        "postgres", prefix="sgjobs-outbox", pg_admin_url=PG_ADMIN_URL, redis_url=REDIS_URL
    ) as b:
        assert b.database_url is not None
        yield make(b.database_url)
        get_engine(b.database_url).dispose()


def _job(settings: Settings, url: str | None = "http://127.0.0.1:9/hook", **values: Any) -> str:
    spec: dict[str, Any] = {"model": "yolo_nas_s", "webhook": {"url": url} if url else None}
    with session_scope(settings.database_url) as session:
        columns: dict[str, Any] = {
            "name": "hooked",
            "tenant": "default",
            "status": JobStatus.queued,
            "model": "yolo_nas_s",
            "spec": spec,
            "max_epochs": 1,
            "best_metric_name": "mAP@0.50",
            "created_at": utcnow(),
            **values,
        }
        job = Job(**columns)
        session.add(job)
        session.flush()
        return job.id


def _rows(settings: Settings, job_id: str) -> list[WebhookDelivery]:
    with session_scope(settings.database_url) as session:
        return list(outbox.of_job(session, job_id=job_id))


def test_one_message_per_final_status(settings: Settings) -> None:
    job_id = _job(settings)
    with session_scope(settings.database_url) as session:
        assert lifecycle.cancel_queued(session, job_id=job_id)
        assert not lifecycle.cancel_queued(session, job_id=job_id)
    # Resumed (queued again), claimed, and ended again: a second final status, a second message.
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.queued))
        attempt = lifecycle.claim(
            session, job_id=job_id, worker="w", job_dir=Path("/tmp/x"), lease_seconds=60
        )
        assert attempt == 1
    with session_scope(settings.database_url) as session:
        assert lifecycle.finish(session, job_id=job_id, status=JobStatus.succeeded, best_value=0.5, attempt=1)
        assert not lifecycle.finish(session, job_id=job_id, status=JobStatus.failed, attempt=1)
    rows = _rows(settings, job_id)
    assert [(r.sequence, r.payload["status"]) for r in rows] == [(1, "cancelled"), (2, "succeeded")]
    assert rows[1].payload["best_metric"] == {"name": "mAP@0.50", "value": 0.5}
    assert rows[0].id != rows[1].id and all(r.state == DeliveryState.pending for r in rows)
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(Job.finishes).where(Job.id == job_id)) == 2


def test_the_unique_key_refuses_a_second_message_for_one_status(settings: Settings) -> None:
    job_id = _job(settings)
    with session_scope(settings.database_url) as session:
        lifecycle.cancel_queued(session, job_id=job_id)
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError), session_scope(settings.database_url) as session:
        outbox.add(session, job_id=job_id, sequence=1, url="http://127.0.0.1:9/", payload={})


def test_exhausted_restarts_and_jobs_without_webhook(settings: Settings) -> None:
    lost = _job(settings, status=JobStatus.running, attempt=1, worker="w", restarts=2, max_restarts=2)
    plain = _job(settings, url=None)
    with session_scope(settings.database_url) as session:
        assert lifecycle.lose_attempt(session, job_id=lost, attempt=1, why="test") == JobStatus.failed
        assert lifecycle.cancel_queued(session, job_id=plain)
    (row,) = _rows(settings, lost)
    assert row.payload["status"] == "failed"
    assert row.payload["error"]["reason"] == FailureReason.worker_lost
    assert _rows(settings, plain) == []


def test_one_claimer_wins_and_a_lapsed_claim_is_taken_over(settings: Settings) -> None:
    job_id = _job(settings)
    with session_scope(settings.database_url) as session:
        lifecycle.cancel_queued(session, job_id=job_id)
    with session_scope(settings.database_url) as session:
        (first,) = outbox.claim_due(session, limit=10, hold_seconds=1)
    with session_scope(settings.database_url) as session:
        assert outbox.claim_due(session, limit=10, hold_seconds=1) == []
    time.sleep(1.5)  # the first sender "died": its hold lapses
    with session_scope(settings.database_url) as session:
        (second,) = outbox.claim_due(session, limit=10, hold_seconds=60)
    assert (second.id, second.attempt) == (first.id, 2)
    with session_scope(settings.database_url) as session:
        # The dead sender's late result changes nothing; the holder's does.
        assert not outbox.mark_delivered(session, delivery_id=first.id, attempt=1, status_code=200)
        assert outbox.mark_delivered(session, delivery_id=second.id, attempt=2, status_code=200)
    (row,) = _rows(settings, job_id)
    assert (row.state, row.attempts) == (DeliveryState.delivered, 2)


def test_a_failed_attempt_waits_for_its_backoff(settings: Settings) -> None:
    job_id = _job(settings)
    with session_scope(settings.database_url) as session:
        lifecycle.cancel_queued(session, job_id=job_id)
    with session_scope(settings.database_url) as session:
        (claimed,) = outbox.claim_due(session, limit=1, hold_seconds=60)
        state = outbox.mark_failed_attempt(
            session, delivery_id=claimed.id, attempt=1, error="HTTP 500", status_code=500, retry_in=60
        )
        assert state == DeliveryState.pending
    with session_scope(settings.database_url) as session:
        assert outbox.claim_due(session, limit=1, hold_seconds=60) == []


def test_backoff_grows_with_jitter_up_to_the_cap() -> None:
    waits = [outbox.backoff_seconds(n, base=10, cap=100) for n in range(1, 8)]
    assert 5 <= waits[0] <= 10 and 10 <= waits[1] <= 20 and 20 <= waits[2] <= 40
    assert all(50 <= w <= 100 for w in waits[4:])
    assert len({outbox.backoff_seconds(3, base=10, cap=100) for _ in range(20)}) > 1


def _events(settings: Settings, job_id: str) -> list[JobEvent]:
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def test_sender_signs_retries_and_records(settings: Settings) -> None:
    receiver = Receiver()
    try:
        url = receiver.url("outbox-retry", answers=[500, 302])
        job_id = _job(settings, url=url)
        with session_scope(settings.database_url) as session:
            lifecycle.cancel_queued(session, job_id=job_id)
        sender = Sender(settings, note=lifecycle.note)
        try:
            deadline = time.monotonic() + 30
            while len(receiver.received("outbox-retry")) < 3 and time.monotonic() < deadline:
                sender.send_due()
                time.sleep(0.1)
        finally:
            sender.close()
        messages = receiver.received("outbox-retry")
        assert len(messages) == 3
        # The 302 was not followed.
        assert receiver.received("outbox-retry-redirected") == []
        bodies = [verified(settings, m) for m in messages]
        assert len({m.headers["x-sgjobs-delivery"] for m in messages}) == 1
        assert {b["delivery_id"] for b in bodies} == {messages[0].headers["x-sgjobs-delivery"]}
        assert bodies[0]["links"]["job"] == f"https://sgjobs.example.com/jobs/{job_id}"
        assert all(m.headers["host"] == f"127.0.0.1:{receiver.port}" for m in messages)
        stamps = [m.headers["x-sgjobs-timestamp"] for m in messages]
        assert [str(b["timestamp"]) for b in bodies] == stamps
        (row,) = _rows(settings, job_id)
        assert (row.state, row.attempts, row.last_status_code) == (DeliveryState.delivered, 3, 200)
        assert "delivered to 127.0.0.1 (HTTP 200, attempt 3)" in _events(settings, job_id)[-1].message
    finally:
        receiver.close()


def test_a_host_no_longer_allowed_is_failed_at_once(settings: Settings) -> None:
    job_id = _job(settings, url="http://127.0.0.1:9/gone")
    with session_scope(settings.database_url) as session:
        lifecycle.cancel_queued(session, job_id=job_id)
    changed = settings.model_copy(update={"webhook_allowed_hosts": ["hooks.example.com"]})
    sender = Sender(changed, note=lifecycle.note)
    try:
        assert sender.send_due() == 1
    finally:
        sender.close()
    (row,) = _rows(settings, job_id)
    assert (row.state, row.attempts) == (DeliveryState.failed, 1)
    assert "SGJOBS_WEBHOOK_ALLOWED_HOSTS" in (row.last_error or "")
    last = _events(settings, job_id)[-1]
    assert last.level == "warning" and "failed after 1 attempt(s)" in last.message


def test_message_body_has_the_promised_fields(settings: Settings) -> None:
    from app.webhooks.payload import render

    job_id = _job(settings, status=JobStatus.running, attempt=1, worker="w")
    with session_scope(settings.database_url) as session:
        lifecycle.finish(
            session,
            job_id=job_id,
            status=JobStatus.failed,
            reason=FailureReason.dataset_error,
            message=f"cannot read {settings.home}/datasets/x/train/a.json",
            attempt=1,
        )
    (row,) = _rows(settings, job_id)
    body, timestamp = render(settings, delivery_id=row.id, event=row.event, recorded=row.payload, now=1000)
    data = json.loads(body)
    assert timestamp == 1000 and data["timestamp"] == 1000
    assert {"job_id", "name", "status", "best_metric", "error", "links", "event", "delivery_id"} <= set(data)
    assert (data["job_id"], data["name"], data["status"]) == (job_id, "hooked", "failed")
    assert data["error"]["reason"] == "dataset_error"
    # Redacted as for a member: no host path.
    assert str(settings.home) not in data["error"]["message"] and "<datasets>" in data["error"]["message"]
    assert set(data["links"]) == {"job", "metrics", "events", "artifacts"}


def test_https_goes_to_the_checked_address_under_its_own_name(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The DNS answer and the network are stand-ins here (a public name cannot be reached from a
    # test); what is checked is the request the sender hands to the transport.
    monkeypatch.setattr(targets, "resolve", lambda host, port: [ipaddress.ip_address("93.184.216.34")])
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    job_id = _job(settings, url="https://user:pw@hooks.example.com:8443/in?team=a")
    with session_scope(settings.database_url) as session:
        lifecycle.cancel_queued(session, job_id=job_id)
    allowed = settings.model_copy(update={"webhook_allowed_hosts": ["hooks.example.com:8443"]})
    sender = Sender(allowed, note=lifecycle.note, transport=httpx.MockTransport(answer))
    try:
        assert sender.send_due() == 1
    finally:
        sender.close()
    (request,) = seen
    assert (request.url.host, request.url.port, request.url.raw_path) == (
        "93.184.216.34",
        8443,
        b"/in?team=a",
    )
    assert request.headers["host"] == "hooks.example.com:8443"
    assert request.extensions["sni_hostname"] == "hooks.example.com"
    assert request.headers["authorization"].startswith("Basic ")
    (row,) = _rows(settings, job_id)
    assert (row.state, row.last_status_code) == (DeliveryState.delivered, 204)
