"""Per-tenant quotas: over one that frees up with time, 429 with Retry-After; else 413 naming it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
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


def _cancel(service: Service, job_id: str) -> None:
    """Cancel and wait for the end, so the tenant's next test starts with no active job."""
    service.client.post(f"/jobs/{job_id}/cancel")
    service.wait(job_id)


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
            _cancel(service, first.json()["id"])
    # An admin is not held to a tenant's quotas.
    admins = service.client.post("/jobs", json=tiny_spec(f"{TENANT}/q", training={"max_epochs": 3}))
    assert admins.status_code == 201, admins.text
    _cancel(service, admins.json()["id"])


def test_job_quota_holds_for_concurrent_submits(service: Service, service_settings: Settings) -> None:
    make_shapes(service.datasets_dir / TENANT, "race", splits=(("train", 4), ("valid", 2)))
    key = make_key(service_settings, TENANT)

    def submit(_: int) -> httpx.Response:
        with client_for(service, key) as client:
            return client.post("/jobs", json=tiny_spec("race"))

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(submit, range(8)))
    created = [r.json()["id"] for r in responses if r.status_code == 201]
    try:
        # The quota is one active job: one submit wins, all the others see it.
        assert len(created) == 1, [r.status_code for r in responses]
        assert sorted(r.status_code for r in responses) == [201] + [429] * 7, [r.text for r in responses]
    finally:
        for job_id in created:
            _cancel(service, job_id)


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


def test_storage_quota_charges_new_files_only(
    service: Service, service_settings: Settings, standins: Path
) -> None:
    with client_for(service, make_key(service_settings, "team-weights")) as client:

        def upload(name: str) -> httpx.Response:
            with open(standins / name, "rb") as file:
                return client.post("/weights", files={"file": (name, file)})

        first = upload("s5_named.pth")
        assert first.status_code == 201, first.text
        try:
            # The same file again is the same weights: nothing new is stored, so the full quota is no bar.
            again = upload("s5_named.pth")
            assert again.status_code == 200, again.text
            assert again.json()["id"] == first.json()["id"]
            other = upload("s80_ema.pth")
            assert other.status_code == 413, other.text
            assert _limit(other.json()) == "quota_storage_bytes"
        finally:
            client.delete(f"/weights/{first.json()['id']}")
