"""/predict under concurrency, end to end against a running `sgjobs serve`: requests to one model
share forward passes and each gets its own images back; models do not wait on each other; slow
predictions and an export leave the rest of the API responsive; a dead inference process fails
every waiting request with 503 and the next one works.

Predictions are made slow for real: SG's 640 px YOLO-NAS-S (the COCO stand-in weights, 80 classes)
on many images per request, on this machine's CPUs.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.prediction.helpers import encode, scene, trained_job
from tests.support import Service
from tests.weights.test_router import upload

pytestmark = [pytest.mark.slow, pytest.mark.backends("sqlite")]


@pytest.fixture(scope="module")
def job(service: Service) -> dict[str, Any]:
    """Model B: the shared tiny job (64 px input: fast)."""
    return trained_job(service)


@pytest.fixture(scope="module")
def coco(service: Service, standins: Path) -> dict[str, Any]:
    """Model A: 640 px YOLO-NAS-S weights (slow on a CPU), loaded once."""
    response = upload(service, standins / "yolo_nas_s_coco.pth")
    assert response.status_code in (200, 201), response.text
    weights: dict[str, Any] = response.json()
    warm = _predict(service, [("warm.png", _png(0))], weights_id=weights["id"])
    assert warm.status_code == 200, warm.text
    return weights


def _png(seed: int, size: tuple[int, int] = (640, 480)) -> bytes:
    return encode(scene(*size, seed=seed))


def _predict(service: Service, files: list[tuple[str, bytes]], **fields: str) -> httpx.Response:
    return service.client.post(
        "/predict",
        data=fields,
        files=[("files", (name, data, "image/png")) for name, data in files],
        timeout=600,
    )


class Calls:
    """Requests on threads of their own, started now; `results()` once they are all done."""

    def __init__(self, calls: list[Callable[[], httpx.Response]]) -> None:
        self.outcomes: list[httpx.Response | BaseException | None] = [None] * len(calls)
        self.threads = [threading.Thread(target=self._run, args=(i, c)) for i, c in enumerate(calls)]
        for thread in self.threads:
            thread.start()

    def _run(self, i: int, call: Callable[[], httpx.Response]) -> None:
        try:
            self.outcomes[i] = call()
        except BaseException as exc:
            self.outcomes[i] = exc

    def alive(self) -> int:
        return sum(thread.is_alive() for thread in self.threads)

    def results(self) -> list[httpx.Response]:
        for thread in self.threads:
            thread.join(900)
        responses = []
        for outcome in self.outcomes:
            assert isinstance(outcome, httpx.Response), outcome
            responses.append(outcome)
        return responses


def _stats(service: Service) -> dict[str, Any]:
    response = service.client.get("/predict/stats")
    assert response.status_code == 200, response.text
    stats: dict[str, Any] = response.json()
    return stats


def _until_received(service: Service, count: int) -> dict[str, Any]:
    """The stats once the inference process has received `count` predictions in all."""
    for _ in range(3000):
        stats = _stats(service)
        if stats["requests"] >= count:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"the inference process never received {count} predictions")


def _detections(image: dict[str, Any]) -> list[tuple[float, ...]]:
    return sorted((d["class_id"], d["score"], *d["box"]) for d in image["detections"])


def test_requests_to_one_model_share_a_pass_and_each_gets_its_own_images_in_order(
    service: Service, job: dict[str, Any]
) -> None:
    # Three images per request, two of them with the same file name; every request different.
    requests = [
        [
            ("same.png", _png(10 * r, (160, 120))),
            ("other.png", _png(10 * r + 1, (96, 200))),
            ("same.png", _png(10 * r + 2, (200, 90))),
        ]
        for r in range(8)
    ]
    alone = []
    for files in requests:
        response = _predict(service, files, job_id=job["id"], conf="0.05")
        assert response.status_code == 200, response.text
        alone.append(response.json())
    merged_before = _stats(service)["merged_requests"]
    together: list[dict[str, Any]] = []
    for _ in range(3):  # concurrent clients nearly always arrive within one pass of another
        calls = Calls(
            [partial(_predict, service, files, job_id=job["id"], conf="0.05") for files in requests]
        )
        together = [r.json() for r in calls.results()]
        if any(body["batch_requests"] > 1 for body in together):
            break
    assert any(body["batch_requests"] > 1 for body in together), [b["batch_requests"] for b in together]
    assert _stats(service)["merged_requests"] > merged_before
    for files, single, batched in zip(requests, alone, together, strict=True):
        assert (
            [i["file"] for i in batched["images"]]
            == [name for name, _ in files]
            == ["same.png", "other.png", "same.png"]
        )
        assert [(i["width"], i["height"]) for i in batched["images"]] == [(160, 120), (96, 200), (200, 90)]
        assert single["batch_requests"] == 1 or single["batch_images"] >= 3
        for a, b in zip(single["images"], batched["images"], strict=True):
            ours, theirs = _detections(a), _detections(b)
            assert len(ours) == len(theirs), (a, b)
            for x, y in zip(ours, theirs, strict=True):
                assert x[0] == y[0] and x[1] == pytest.approx(y[1], abs=1e-3)
                assert x[2:] == pytest.approx(y[2:], abs=0.05)


def test_a_request_for_one_model_does_not_wait_for_a_long_inference_of_another(
    service: Service, job: dict[str, Any], coco: dict[str, Any]
) -> None:
    assert _predict(service, [("b.png", _png(1, (96, 96)))], job_id=job["id"]).status_code == 200
    received = _stats(service)["requests"]
    slow = Calls(
        [lambda: _predict(service, [(f"a{i}.png", _png(i)) for i in range(16)], weights_id=coco["id"])]
    )
    _until_received(service, received + 1)
    fast = _predict(service, [("b.png", _png(1, (96, 96)))], job_id=job["id"])
    assert fast.status_code == 200, fast.text
    assert slow.alive() == 1, "the 16-image request of the 640 px model finished first"
    [answer] = slow.results()
    assert answer.status_code == 200, answer.text
    assert answer.json()["batch_images"] == 16


def test_health_and_jobs_answer_within_a_second_while_16_slow_predictions_and_an_export_run(
    service: Service, coco: dict[str, Any], standins: Path
) -> None:
    other = upload(service, standins / "s5_named.pth")
    assert other.status_code in (200, 201), other.text
    received = _stats(service)["requests"]
    export = Calls([lambda: service.client.post(f"/weights/{other.json()['id']}/export", timeout=600)])
    predictions = Calls(
        [
            partial(
                _predict, service, [(f"{i}-{j}.png", _png(i + j)) for j in range(2)], weights_id=coco["id"]
            )
            for i in range(16)
        ]
    )
    _until_received(service, received + 16)
    worst = {"/healthz": 0.0, "/jobs": 0.0}
    rounds = exporting = 0
    while predictions.alive() == 16 and rounds < 10:
        exporting += export.alive()
        for path in worst:
            start = time.perf_counter()
            response = service.client.get(path, params={"limit": 5} if path == "/jobs" else None)
            worst[path] = max(worst[path], time.perf_counter() - start)
            assert response.status_code == 200, response.text
        rounds += 1
        time.sleep(0.2)
    assert rounds >= 3, "the predictions ended before the API was asked enough"
    assert exporting, "the export ended before the API was asked"
    # The bound: each answers within 1 s while all 16 wait.
    assert worst["/healthz"] < 1.0 and worst["/jobs"] < 1.0, worst
    for response in predictions.results():
        assert response.status_code == 200, response.text
    [exported] = export.results()
    assert exported.status_code == 200, exported.text


def test_a_killed_inference_process_fails_every_waiting_request_with_503_and_the_next_works(
    service: Service, coco: dict[str, Any]
) -> None:
    before = _stats(service)
    waiting = Calls(
        [
            partial(
                _predict, service, [(f"{i}-{j}.png", _png(i + j)) for j in range(4)], weights_id=coco["id"]
            )
            for i in range(6)
        ]
    )
    stats = _until_received(service, before["requests"] + 6)
    os.kill(stats["pid"], signal.SIGKILL)
    for response in waiting.results():
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"]
    again = _predict(service, [("again.png", _png(3))], weights_id=coco["id"])
    assert again.status_code == 200, again.text
    after = _stats(service)
    assert after["process_starts"] == before["process_starts"] + 1 and after["pid"] != stats["pid"]
