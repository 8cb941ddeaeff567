"""The worker's Celery app against the embedded (SQLite) broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu.transport import sqlalchemy as sqla_transport

from app.settings import get_settings
from worker.celery_app import create_celery


@pytest.fixture
def embedded_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Settings of a worker on the embedded defaults under `tmp_path`, polling every 50 ms; the
    transport's process-wide interval is put back afterwards."""
    monkeypatch.setenv("SGJOBS_HOME", str(tmp_path))
    monkeypatch.delenv("SGJOBS_BROKER_URL", raising=False)
    monkeypatch.setenv("SGJOBS_BROKER_POLL_SECONDS", "0.05")
    transport = sqla_transport.Transport
    monkeypatch.setattr(transport, "polling_interval", transport.polling_interval)
    get_settings.cache_clear()
    try:
        yield tmp_path / "broker.db"
    finally:
        get_settings.cache_clear()


def test_worker_polls_the_embedded_broker_at_its_setting(embedded_broker: Path) -> None:
    app = create_celery()
    assert app.conf.broker_url.startswith("sqla+sqlite:")
    with app.connection_for_read() as conn:
        # kombu's own default is one ask a second: up to a second between a POST and its claim.
        assert conn.transport.polling_interval == 0.05
        # The interval is not among the options kombu hands to create_engine (which refuses unknown
        # ones): the broker still carries a message both ways.
        queue = conn.SimpleQueue("sgjobs-probe")
        try:
            queue.put({"job_id": "probe"})
            message = queue.get(timeout=10)
            assert message.payload == {"job_id": "probe"}
            message.ack()
        finally:
            queue.close()
    assert embedded_broker.is_file()
