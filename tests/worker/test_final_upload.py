"""The object store does not answer when a training ends (issue 14).

A service on a real SeaweedFS store trains real jobs; the `final_upload` failpoint makes the store
refuse the trained job's final upload, the way an unreachable store would (StorageError), for one job
at a time. A job is recorded as succeeded only once its model is in the store:
- a short outage: the upload is tried again and the job succeeds in its first attempt;
- a long one: the attempt is given up as lost and the job queued; the next attempt resumes from its
  checkpoints and uploads the model;
- a long one with no restarts left: the job fails as `storage_unavailable`, saying why.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from app.jobs import files
from app.storage import S3Store
from app.testing import S3Server
from tests.remote_store import serve_with_store
from tests.support import Service, make_shapes, tiny_spec

pytestmark = [pytest.mark.backends("sqlite"), pytest.mark.slow]

PREFIX = "final-upload"
RETRY_SECONDS = 4.0
FAILPOINTS = {
    "final_upload": [
        # Two refusals: tried at 0 s, 1 s and 3 s, the third try succeeds within the 4 s.
        {"action": "store_down", "job_name": "short-outage", "times": 2},
        {"action": "store_down", "job_name": "long-outage", "attempt": 1},
        {"action": "store_down", "job_name": "no-restarts"},
    ]
}


@pytest.fixture(scope="module")
def remote(backend: Any, s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with serve_with_store(
        backend,
        s3,
        tmp_path_factory.mktemp("final-upload"),
        PREFIX,
        storage_retry_seconds=RETRY_SECONDS,
        storage_sync_seconds=0.5,
        failpoints=json.dumps(FAILPOINTS),
    ) as running:
        make_shapes(running.datasets_dir, "final-upload", splits=(("train", 4), ("valid", 2)))
        yield running


@pytest.fixture(scope="module")
def store(s3: S3Server) -> S3Store:
    return S3Store(s3.bucket, PREFIX, client=s3.client())


def _spec(name: str, **overrides: Any) -> dict[str, Any]:
    return tiny_spec("final-upload", name=name, training={"batch_size": 2}, **overrides)


def _messages(service: Service, job_id: str) -> list[str]:
    return [e["message"] for e in service.events(job_id)]


def _stored(store: S3Store, job_id: str) -> list[str]:
    return [info.key for info in store.list(files.job_key(job_id))]


def test_jobs_succeed_only_once_their_model_is_in_the_store(remote: Service, store: S3Store) -> None:
    short = remote.submit(_spec("short-outage"))["id"]
    long = remote.submit(_spec("long-outage"))["id"]
    never = remote.submit(_spec("no-restarts", max_restarts=0))["id"]

    # A short outage: two tries refused, the third stores it; one attempt.
    done = remote.wait(short, timeout=600)
    messages = _messages(remote, short)
    assert done["status"] == "succeeded", messages
    assert (done["attempt"], done["restarts"]) == (1, 0)
    retries = [m for m in messages if m.startswith("the trained model could not be uploaded")]
    assert len(retries) == 2 and "failpoint final_upload" in retries[0], messages
    assert any(key.endswith("/ckpt_best.pth") for key in _stored(store, short))

    # A long outage: attempt 1 is lost after 4 s of refusals; attempt 2 resumes and stores the model.
    done = remote.wait(long, timeout=600)
    messages = _messages(remote, long)
    assert done["status"] == "succeeded", messages
    assert (done["attempt"], done["restarts"]) == (2, 1), messages
    lost = [m for m in messages if m.startswith("attempt 1 on") and " lost: " in m]
    assert lost and "could not be uploaded to the object store for 4 s" in lost[0], messages
    assert "queued to resume" in lost[0]
    assert any(m.startswith("attempt 2 resumes from ckpt_") for m in messages), messages
    assert any(key.endswith("/ckpt_best.pth") for key in _stored(store, long))

    # No restarts left: failed, saying why; never recorded as succeeded.
    done = remote.wait(never, timeout=600)
    assert done["status"] == "failed" and done["attempt"] == 1, _messages(remote, never)
    assert done["error"]["reason"] == "storage_unavailable"
    assert "could not be uploaded to the object store for 4 s" in done["error"]["message"]
    assert "failpoint final_upload" in done["error"]["message"]
