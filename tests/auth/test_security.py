"""Host header allow-list (DNS rebinding) and cross-site requests."""

from __future__ import annotations

import pytest

from tests.support import Service

pytestmark = pytest.mark.backends("sqlite")


def test_unknown_host_names_are_refused(service: Service) -> None:
    response = service.client.get("/jobs", headers={"Host": "attacker.example:8000"})
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "host_not_allowed" and "SGJOBS_ALLOWED_HOSTS" in body["detail"]
    # Even the health checks: a rebinding page must learn nothing.
    assert service.client.get("/healthz", headers={"Host": "attacker.example"}).status_code == 400
    for host in ("localhost:1234", "127.0.0.1", "[::1]:80"):
        assert service.client.get("/healthz", headers={"Host": host}).status_code == 200, host


def test_cross_site_requests_cannot_act(service: Service) -> None:
    # A form post from another site, even one that carried a key, is refused before any route.
    response = service.client.post("/jobs", json={}, headers={"Origin": "https://evil.example"})
    assert response.status_code == 403
    assert response.json()["code"] == "cross_origin"
    # The service's own origin (its docs page) may; reading is not acting, and no CORS is granted.
    own = service.base_url
    assert service.client.post("/jobs", json={}, headers={"Origin": own}).status_code == 422
    response = service.client.get("/jobs", headers={"Origin": "https://evil.example"})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    preflight = service.client.options(
        "/jobs", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers
