"""A real HTTP receiver for the service's webhook messages, and helpers to read them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from app.settings import Settings
from app.webhooks import signing
from tests.conftest import SERVICE_SETTINGS
from tests.webhooks.receiver import Received, Receiver


@pytest.fixture(scope="session")
def hook_settings(service_settings: Settings) -> Settings:
    """`service_settings` with the service's webhook settings, for jobs made directly."""
    webhooks = {k: v for k, v in SERVICE_SETTINGS.items() if k.startswith("webhook_")}
    return service_settings.model_copy(update=webhooks)


@pytest.fixture(scope="session")
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.close()


def verified(settings: Settings, message: Received) -> dict[str, Any]:
    """The message's JSON, once its signature checks out with the service's key."""
    key = signing.secret(settings)
    signature = message.headers["x-sgjobs-signature"]
    assert signature.startswith("sha256=")
    assert signing.verify(key, message.body, signature), "signature does not match the body"
    body: dict[str, Any] = json.loads(message.body)
    return body
