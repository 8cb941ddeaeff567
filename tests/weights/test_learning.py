"""The point of weights: fine-tuning from a detector that already knows how to see learns faster.

Job A learned generated shapes from scratch (`tests.worker.helpers.learned_job`, shared with the
from-scratch learning test). Its checkpoint is promoted to weights, and the same file uploaded is the
same weights. Job B trains on a dataset with other classes ("cross", which A never saw, and
"circle"), once from those weights and once from random weights, with the same small budget.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import Service, make_shapes
from tests.worker.helpers import learned_job

# One worker runs both learning tests (with pytest-xdist): they share `learned_job`'s training.
pytestmark = [pytest.mark.slow, pytest.mark.backends("sqlite"), pytest.mark.xdist_group("learned_job")]

# Measured on the 2-core machine (16 training / 16 validation images, 64 px, 3 epochs, lr 5e-4, no
# warm-up): from A's weights mAP@0.50 reaches 0.36-0.47 by epoch 3 (0.2 after the first), from random
# weights it stays at 0.00 (from scratch it needs about 10 epochs to leave 0, see test_learning).
B_EPOCHS = 3
MIN_GAIN = 0.2


def _spec_b(init_from: dict[str, str] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "fine-tune" if init_from else "scratch",
        "model": "yolo_nas_s",
        "dataset": {"format": "coco", "path": "learn-other-classes"},
        "input_size": [64, 64],
        "training": {
            "max_epochs": B_EPOCHS,
            "batch_size": 8,
            "initial_lr": 5e-4,
            "lr_warmup_epochs": 0,
            "average_best_models": False,
            "seed": 0,
        },
    }
    if init_from:
        spec["init_from"] = init_from
    return spec


def test_fine_tuning_from_weights_beats_training_from_scratch(service: Service) -> None:
    job_a = learned_job(service)
    promoted = service.client.post("/weights", json={"from_job": job_a["id"]}, timeout=300)
    assert promoted.status_code in (200, 201), promoted.text
    weights = promoted.json()
    assert weights["classes"] == ["circle", "square", "triangle"] and weights["source"] == "job"

    # A's checkpoint downloaded and uploaded again is the same weights (by hash).
    best = next(
        a
        for a in service.client.get(f"/jobs/{job_a['id']}/artifacts").json()["items"]
        if a["kind"] == "ckpt_best"
    )
    data = service.client.get(best["url"], timeout=300).content
    uploaded = service.client.post(
        "/weights", files={"file": ("ckpt_best.pth", data, "application/octet-stream")}, timeout=300
    )
    assert uploaded.status_code == 200 and uploaded.json()["id"] == weights["id"], uploaded.text

    make_shapes(
        service.datasets_dir,
        "learn-other-classes",
        classes=("cross", "circle"),
        splits=(("train", 16), ("valid", 16)),
        seed=21,
        roboflow_placeholder=False,
    )
    fine_tuned = service.submit(_spec_b({"weights_id": weights["id"]}))
    scratch = service.submit(_spec_b(None))
    maps: dict[str, list[float]] = {}
    for name, job in (("fine-tuned", fine_tuned), ("scratch", scratch)):
        done = service.wait(job["id"], timeout=900)
        assert done["status"] == "succeeded", service.events(job["id"])
        assert done["classes"] == ["cross", "circle"]
        maps[name] = [p["value"] for p in service.metrics(job["id"], name="Valid_mAP@0.50")]
        assert len(maps[name]) == B_EPOCHS, maps
    assert service.job(fine_tuned["id"])["started_from"]["num_classes"] == 3
    print(f"mAP@0.50 per epoch: {maps}")
    gain = max(maps["fine-tuned"]) - max(maps["scratch"])
    assert gain > MIN_GAIN, maps
    # Not one lucky epoch: the last one is clearly ahead too.
    assert maps["fine-tuned"][-1] - maps["scratch"][-1] > MIN_GAIN, maps
