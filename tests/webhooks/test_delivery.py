"""Webhooks through the real API of `sgjobs serve` (both backends) to a real HTTP receiver."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import update

from app.db import db_now, session_scope
from app.jobs import lifecycle
from app.settings import Settings
from app.webhooks import outbox
from app.webhooks.models import DeliveryState, WebhookDelivery
from tests.support import Service, insert_job, make_shapes, make_unreadable_dataset, tiny_spec
from tests.webhooks.conftest import verified
from tests.webhooks.receiver import Receiver

# Attempts the service makes (tests/conftest.py SERVICE_SETTINGS).
MAX_ATTEMPTS = 4


@pytest.fixture(scope="module")
def shapes(service: Service) -> str:
    make_shapes(service.datasets_dir, "hook-shapes", splits=(("train", 4), ("valid", 2)))
    return "hook-shapes"


def _deliveries(settings: Settings, job_id: str) -> list[WebhookDelivery]:
    with session_scope(settings.database_url) as session:
        return list(outbox.of_job(session, job_id=job_id))


def _wait_for_event(service: Service, job_id: str, text: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in service.events(job_id) if text in e["message"]]
        if found:
            return found[-1]
        if time.monotonic() > deadline:
            raise AssertionError(f"no event with {text!r}: {service.events(job_id)}")
        time.sleep(0.1)


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:9/hook",  # 127.0.0.1 is allowed, by that name only
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "https://hooks.example.com/x",
    ],
)
def test_a_host_not_allowed_is_422_naming_the_setting(service: Service, shapes: str, url: str) -> None:
    response = service.post_job(tiny_spec(shapes, webhook={"url": url}))
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["errors"][0]["loc"] == ["body", "webhook", "url"]
    assert "SGJOBS_WEBHOOK_ALLOWED_HOSTS" in problem["detail"]


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "not a url", "file:///etc/passwd", ""])
def test_a_url_that_is_not_http_is_422(service: Service, shapes: str, url: str) -> None:
    response = service.post_job(tiny_spec(shapes, webhook={"url": url}))
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"][:3] == ["body", "webhook", "url"]


def test_cancelled_job_is_reported_once_after_retries(
    service: Service, service_settings: Settings, hook_settings: Settings, receiver: Receiver, shapes: str
) -> None:
    url = receiver.url(f"cancel-{service.backend}", answers=[500, 500])
    # Made as POST /jobs makes it but not sent, so it is still queued when cancelled (no training).
    job_id = insert_job(hook_settings, shapes, spec=tiny_spec(shapes, name="hooked", webhook={"url": url}))
    assert service.client.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"

    messages = receiver.wait_for(f"cancel-{service.backend}", 3)
    event = _wait_for_event(service, job_id, "webhook job.finished delivered")
    assert "(HTTP 200, attempt 3)" in event["message"]
    bodies = [verified(service_settings, m) for m in messages]
    # One message: the same delivery id on every attempt, in the header and the body.
    assert len({m.headers["x-sgjobs-delivery"] for m in messages}) == 1
    assert {b["delivery_id"] for b in bodies} == {messages[0].headers["x-sgjobs-delivery"]}
    assert {m.headers["x-sgjobs-event"] for m in messages} == {"job.finished"}
    body = bodies[-1]
    assert (body["event"], body["job_id"], body["name"], body["status"]) == (
        "job.finished",
        job_id,
        "hooked",
        "cancelled",
    )
    assert body["best_metric"] == {"name": "mAP@0.50", "value": None} and body["error"] is None
    # The links are absolute and lead to the job.
    assert body["links"]["job"] == f"{service.base_url}/jobs/{job_id}"
    for link in body["links"].values():
        assert service.client.get(link).status_code == 200, link
    assert abs(int(messages[-1].headers["x-sgjobs-timestamp"]) - time.time()) < 120

    (row,) = _deliveries(service_settings, job_id)
    assert (row.state, row.attempts, row.id) == (DeliveryState.delivered, 3, body["delivery_id"])
    (shown,) = service.client.get(f"/jobs/{job_id}/webhooks").json()["items"]
    assert (shown["id"], shown["state"], shown["attempts"], shown["status"]) == (
        body["delivery_id"],
        "delivered",
        3,
        "cancelled",
    )
    assert shown["last_status_code"] == 200 and shown["completed_at"] and shown["next_attempt_at"] is None
    # Delivered is final: no other attempt comes.
    time.sleep(1.5)
    assert len(receiver.received(f"cancel-{service.backend}")) == 3


def test_a_receiver_that_keeps_failing_is_given_up(
    service: Service, service_settings: Settings, hook_settings: Settings, receiver: Receiver, shapes: str
) -> None:
    path = f"down-{service.backend}"
    url = receiver.url(path, answers=[302] + [503] * 10)
    job_id = insert_job(hook_settings, shapes, spec=tiny_spec(shapes, webhook={"url": url}))
    service.client.post(f"/jobs/{job_id}/cancel")

    event = _wait_for_event(service, job_id, "webhook job.finished to 127.0.0.1 failed")
    assert event["level"] == "warning"
    assert f"after {MAX_ATTEMPTS} attempt(s): HTTP 503" in event["message"]
    assert len(receiver.received(path)) == MAX_ATTEMPTS
    assert receiver.received(f"{path}-redirected") == []  # the redirect was not followed
    (row,) = _deliveries(service_settings, job_id)
    assert (row.state, row.attempts, row.last_status_code) == (DeliveryState.failed, MAX_ATTEMPTS, 503)
    (shown,) = service.client.get(f"/jobs/{job_id}/webhooks").json()["items"]
    assert (shown["state"], shown["last_error"]) == ("failed", "HTTP 503")


def test_a_claim_held_by_a_sender_that_died_is_taken_over(
    service: Service, service_settings: Settings, hook_settings: Settings, receiver: Receiver, shapes: str
) -> None:
    path = f"crash-{service.backend}"
    job_id = insert_job(hook_settings, shapes, spec=tiny_spec(shapes, webhook={"url": receiver.url(path)}))
    # The job ends and a sender claims its message for 3 s in the same transaction, then "dies":
    # no other sender can take it before the hold lapses.
    with session_scope(service_settings.database_url) as session:
        assert lifecycle.cancel_queued(session, job_id=job_id)
        session.flush()
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id)
            .values(attempts=1, locked_until=db_now(3))
        )
    time.sleep(1.5)
    assert receiver.received(path) == []
    (message,) = receiver.wait_for(path, 1, timeout=30)
    _wait_for_event(service, job_id, "delivered to 127.0.0.1 (HTTP 200, attempt 2)")
    (row,) = _deliveries(service_settings, job_id)
    assert (row.state, row.attempts, row.id) == (
        DeliveryState.delivered,
        2,
        message.headers["x-sgjobs-delivery"],
    )


def test_a_job_failing_on_its_dataset_reports_its_error_redacted(
    service: Service, service_settings: Settings, receiver: Receiver
) -> None:
    path = f"failed-{service.backend}"
    dataset = make_unreadable_dataset(service.datasets_dir, f"hook-unreadable-{service.backend}")
    job = service.submit(tiny_spec(dataset, webhook={"url": receiver.url(path)}))
    assert service.wait(job["id"])["status"] == "failed"
    (message,) = receiver.wait_for(path, 1)
    body = verified(service_settings, message)
    assert (body["job_id"], body["status"]) == (job["id"], "failed")
    assert body["error"]["reason"] == "dataset_error" and body["error"]["message"]
    assert str(service.home) not in message.body.decode()


def test_a_trained_job_reports_success(
    service: Service, service_settings: Settings, receiver: Receiver
) -> None:
    path = f"trained-{service.backend}"
    make_shapes(service.datasets_dir, "hook-train", splits=(("train", 4), ("valid", 2)))
    job = service.submit(tiny_spec("hook-train", webhook={"url": receiver.url(path)}))
    done = service.wait(job["id"])
    assert done["status"] == "succeeded", service.events(job["id"])
    (message,) = receiver.wait_for(path, 1)
    body = verified(service_settings, message)
    assert (body["job_id"], body["status"], body["error"]) == (job["id"], "succeeded", None)
    assert body["best_metric"] == done["best_metric"]
    assert service.client.get(body["links"]["artifacts"]).json()["items"]
    time.sleep(1)
    assert len(receiver.received(path)) == 1
