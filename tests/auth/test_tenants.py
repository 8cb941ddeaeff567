"""Tenants: another tenant's object answers exactly as a missing one, on every route.

The matrix is built from the served OpenAPI document, so a route added without a case here fails
`test_every_operation_is_in_the_matrix`.
"""

from __future__ import annotations

import json
import re
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.settings import Settings
from app.weights.service import SHARED_TENANTS
from tests.auth.helpers import client_for, make_key
from tests.datasets.test_router import upload_multipart
from tests.support import Service, make_shapes, tiny_spec, zip_folder

# Operations whose path names another tenant's object: what to call them with (method from the doc).
# The body, when the operation takes one.
PATH_BODIES: dict[str, Any] = {
    "get_job": None,
    "delete_job": None,
    "cancel_job": None,
    "resume_job": {},
    "list_job_metrics": None,
    "list_job_events": None,
    "list_job_webhooks": None,
    "stream_job": None,
    "list_artifacts": None,
    "download_artifact": None,
    "export_job": None,
    "get_dataset": None,
    "delete_dataset": None,
    "validate_dataset": None,
    "get_weights": None,
    "delete_weights": None,
    "download_weights_artifact": None,
    "export_weights": None,
}
# Operations that name objects in their body or list them: each has its own test below.
BODY_OR_LIST = {
    "create_job": "test_bodies_that_name_another_tenants_objects",
    "create_weights": "test_bodies_that_name_another_tenants_objects",
    "predict": "test_bodies_that_name_another_tenants_objects",
    "list_jobs": "test_lists_show_only_the_tenants_own",
    "list_datasets": "test_lists_show_only_the_tenants_own",
    "list_weights": "test_lists_show_only_the_tenants_own",
    "upload_dataset": "test_lists_show_only_the_tenants_own",
    "get_predict_stats": "tests/auth/test_keys.py::test_a_member_key_is_a_member",
    # Counts every tenant's jobs: admin keys only.
    "get_metrics": "tests/observability/test_metrics.py::test_only_admin_keys_may_scrape",
}
PUBLIC = {"healthz", "readyz"}


@dataclass(frozen=True)
class Tenants:
    a: httpx.Client
    b: httpx.Client
    admin: httpx.Client
    job: str
    dataset: str
    weights: str
    artifact: str


@pytest.fixture(scope="module")
def tenants(
    service: Service, service_settings: Settings, standins: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tenants]:
    """Tenant A with a trained job, an uploaded dataset and uploaded weights; tenant B with nothing."""
    folder = make_shapes(tmp_path_factory.mktemp("tenant-a"), "shapes", splits=(("train", 8), ("valid", 4)))
    with (
        client_for(service, make_key(service_settings, "team-a")) as a,
        client_for(service, make_key(service_settings, "team-b")) as b,
    ):
        owner = Service(
            service.backend, service.base_url, service.home, service.datasets_dir, service.log_file, a
        )
        dataset = upload_multipart(owner, zip_folder(folder)).json()["id"]
        spec = tiny_spec("unused")
        spec["dataset"] = {"id": dataset}
        job = owner.submit(spec)["id"]
        with open(standins / "s5_named.pth", "rb") as file:
            weights = a.post("/weights", files={"file": ("s5.pth", file)}).json()["id"]
        assert owner.wait(job)["status"] == "succeeded"
        artifact = a.get(f"/jobs/{job}/artifacts").json()["items"][0]["name"]
        yield Tenants(a, b, service.client, job, dataset, weights, artifact)


def _missing() -> str:
    return uuid.uuid4().hex


def _url(path: str, ids: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: ids[m.group(1)], path)


def _same_answer(theirs: httpx.Response, missing: httpx.Response, their_id: str, missing_id: str) -> None:
    """The two answers are the same but for the id they name."""
    assert theirs.status_code == missing.status_code, (theirs.text, missing.text)
    assert theirs.text.replace(their_id, "ID") == missing.text.replace(missing_id, "ID")


def _operations(service: Service) -> dict[str, tuple[str, str]]:
    schema = service.client.get("/openapi.json").json()
    return {
        op["operationId"]: (method.upper(), path)
        for path, ops in schema["paths"].items()
        for method, op in ops.items()
    }


def test_every_operation_is_in_the_matrix(service: Service) -> None:
    assert set(_operations(service)) == set(PATH_BODIES) | set(BODY_OR_LIST) | PUBLIC


def test_paths_naming_another_tenants_object_are_404_like_missing(service: Service, tenants: Tenants) -> None:
    theirs = {
        "job_id": tenants.job,
        "dataset_id": tenants.dataset,
        "weights_id": tenants.weights,
        "name": tenants.artifact,
    }
    for operation, (method, path) in _operations(service).items():
        if operation not in PATH_BODIES:
            continue
        missing = {k: (_missing() if k != "name" else v) for k, v in theirs.items()}
        kwargs = {} if PATH_BODIES[operation] is None else {"json": PATH_BODIES[operation]}
        their_answer = tenants.b.request(method, _url(path, theirs), **kwargs)
        missing_answer = tenants.b.request(method, _url(path, missing), **kwargs)
        assert their_answer.status_code == 404, (operation, their_answer.text)
        their_id = next(theirs[k] for k in ("job_id", "dataset_id", "weights_id") if "{" + k + "}" in path)
        missing_id = next(missing[k] for k in ("job_id", "dataset_id", "weights_id") if "{" + k + "}" in path)
        _same_answer(their_answer, missing_answer, their_id, missing_id)
    # The owner and an admin see them (reads only: the objects stay for the other tests).
    for client in (tenants.a, tenants.admin):
        assert client.get(f"/jobs/{tenants.job}").status_code == 200
        assert client.get(f"/jobs/{tenants.job}/artifacts/{tenants.artifact}").status_code == 200
        assert client.get(f"/datasets/{tenants.dataset}").status_code == 200
        assert client.get(f"/weights/{tenants.weights}").status_code == 200
        assert client.get(f"/weights/{tenants.weights}/artifacts/weights.pth").status_code == 200


def test_bodies_that_name_another_tenants_objects(service: Service, tenants: Tenants) -> None:
    # Tenant B's own dataset, by path inside its folder of the datasets directory.
    make_shapes(service.datasets_dir / "team-b", "mine", splits=(("train", 4), ("valid", 2)))
    base = tiny_spec("mine")
    cases = [
        ("/jobs", {**base, "dataset": {"id": tenants.dataset}}, tenants.dataset),
        ("/jobs", {**base, "init_from": {"job_id": tenants.job}}, tenants.job),
        ("/jobs", {**base, "init_from": {"weights_id": tenants.weights}}, tenants.weights),
        ("/weights", {"from_job": tenants.job}, tenants.job),
    ]
    for path, body, their_id in cases:
        missing_id = _missing()
        missing_body = json.loads(json.dumps(body).replace(their_id, missing_id))
        their_answer = tenants.b.post(path, json=body)
        assert their_answer.status_code == 422, (path, body, their_answer.text)
        _same_answer(their_answer, tenants.b.post(path, json=missing_body), their_id, missing_id)
    image = (service.datasets_dir / "team-b" / "mine" / "valid").glob("*.jpg")
    data = next(image).read_bytes()
    for field, their_id in (("job_id", tenants.job), ("weights_id", tenants.weights)):
        missing_id = _missing()
        answers = [
            tenants.b.post("/predict", data={field: value}, files=[("files", ("x.jpg", data))])
            for value in (their_id, missing_id)
        ]
        assert answers[0].status_code == 404, answers[0].text
        _same_answer(answers[0], answers[1], their_id, missing_id)


def test_dataset_paths_resolve_in_the_tenants_folder(service: Service, tenants: Tenants) -> None:
    make_shapes(service.datasets_dir, "outside-b", splits=(("train", 4), ("valid", 2)))
    for path in ("outside-b", "../outside-b", "../team-a"):
        answer = tenants.b.post("/jobs", json=tiny_spec(path))
        assert answer.status_code == 422, (path, answer.text)
        assert answer.json()["errors"][0]["loc"] == ["body", "dataset", "path"]
    # Its own folder works (the job is cancelled at once: only where it resolved matters here).
    make_shapes(service.datasets_dir / "team-b", "own", splits=(("train", 4), ("valid", 2)))
    created = tenants.b.post("/jobs", json=tiny_spec("own"))
    assert created.status_code == 201, created.text
    assert created.json()["tenant"] == "team-b"
    tenants.b.post(f"/jobs/{created.json()['id']}/cancel")


def test_lists_show_only_the_tenants_own(tenants: Tenants) -> None:
    def ids(client: httpx.Client, path: str) -> set[str]:
        return {item["id"] for item in client.get(path, params={"limit": 200}).json()["items"]}

    mine = {"/jobs": tenants.job, "/datasets": tenants.dataset, "/weights": tenants.weights}
    for path, their_id in mine.items():
        assert their_id in ids(tenants.a, path)
        assert their_id in ids(tenants.admin, path)
        assert their_id not in ids(tenants.b, path)
        page = tenants.b.get(path).json()
        assert page["total"] == len(page["items"])  # counts only what B may see
        # Besides its own, a tenant sees the weights every tenant shares (the operator's published
        # ones, which a test on the same service may have registered before this one).
        shared = SHARED_TENANTS if path == "/weights" else ()
        for item in tenants.a.get(path).json()["items"]:
            assert item["tenant"] in ("team-a", *shared), item


def test_members_see_no_host_details(tenants: Tenants, service: Service) -> None:
    host_details = [re.escape(str(service.home)), rf"\b{re.escape(socket.gethostname())}\b"]
    job = tenants.a.get(f"/jobs/{tenants.job}").json()
    events = tenants.a.get(f"/jobs/{tenants.job}/events").json()
    artifacts = tenants.a.get(f"/jobs/{tenants.job}/artifacts").json()
    for answer in (job, events, artifacts):
        text = json.dumps(answer)
        for detail in host_details:
            assert not re.search(detail, text), (detail, text[:2000])
    assert job["job_dir"] is None
    assert job["worker"].startswith("worker-")
    assert all(path.startswith("<jobs>/") for path in job["artifacts"].values())
    # An admin sees them as written.
    full = tenants.admin.get(f"/jobs/{tenants.job}").json()
    assert full["job_dir"].startswith(str(service.home)) and full["worker"].startswith("sgjobs@")
