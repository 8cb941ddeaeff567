"""Per-tenant quotas: over one that frees up with time, 429 with Retry-After; else 413 naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import Settings
from tests.auth.helpers import client_for, make_key
from tests.support import Service, make_shapes, tiny_spec, zip_folder

pytestmark = pytest.mark.backends("sqlite", "postgres")
TENANT = "team-quota"  # its quotas are in tests/conftest.py's SERVICE_SETTINGS


def _limit(body: dict[str, object]) -> str:
    limits = body["limits"]
    assert isinstance(limits, list)
    return str(limits[0]["limit"])


def test_job_quotas(service: Service, service_settings: Settings) -> None:
    make_shapes(service.datasets_dir / TENANT, "q", splits=(("train", 4), ("valid", 2)))
    with client_for(service, make_key(service_settings, TENANT)) as client:
        too_long = client.post("/jobs", json=tiny_spec("q", training={"max_epochs": 3}))
        assert too_long.status_code == 413, too_long.text
        assert _limit(too_long.json()) == "quota_epoch_pixels"

        first = client.post("/jobs", json=tiny_spec("q"))
        assert first.status_code == 201, first.text
        try:
            second = client.post("/jobs", json=tiny_spec("q"))
            assert second.status_code == 429, second.text
            assert int(second.headers["retry-after"]) > 0
            assert _limit(second.json()) == "quota_active_jobs"
        finally:
            client.post(f"/jobs/{first.json()['id']}/cancel")
    # An admin is not held to a tenant's quotas.
    admins = service.client.post("/jobs", json=tiny_spec(f"{TENANT}/q", training={"max_epochs": 3}))
    assert admins.status_code == 201, admins.text
    service.client.post(f"/jobs/{admins.json()['id']}/cancel")


def test_storage_quota(service: Service, service_settings: Settings, tmp_path: Path, standins: Path) -> None:
    folder = make_shapes(tmp_path, "big", splits=(("train", 16), ("valid", 4)))
    with client_for(service, make_key(service_settings, TENANT)) as client:
        response = client.post("/datasets", files={"file": ("d.zip", zip_folder(folder), "application/zip")})
        assert response.status_code == 413, response.text
        assert _limit(response.json()) == "quota_storage_bytes"
        with open(standins / "s5_named.pth", "rb") as file:
            response = client.post("/weights", files={"file": ("s5.pth", file)})
        assert response.status_code == 413, response.text
        assert _limit(response.json()) == "quota_storage_bytes"
    # Nothing was kept.
    assert not any(d["tenant"] == TENANT for d in service.client.get("/datasets").json()["items"])
