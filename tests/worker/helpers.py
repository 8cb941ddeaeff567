"""A job that really learned, trained once per test session and shared by the learning tests."""

from __future__ import annotations

from typing import Any

from tests.support import Service, make_shapes

LEARN_DATASET = "learn-shapes"
LEARN_EPOCHS = 22
_learned: dict[str, dict[str, Any]] = {}


def learned_job(service: Service) -> dict[str, Any]:
    """A succeeded job trained from scratch on generated shapes (48 training images, 96 px, 22 epochs):
    it reaches a useful mAP (see tests/worker/test_learning.py). Trained once per service."""
    if service.base_url not in _learned:
        make_shapes(service.datasets_dir, LEARN_DATASET, splits=(("train", 48), ("valid", 16)), seed=11)
        job = service.submit(
            {
                "name": "learning",
                "model": "yolo_nas_s",
                "dataset": {"format": "coco", "path": LEARN_DATASET},
                "input_size": [96, 96],
                "training": {
                    "max_epochs": LEARN_EPOCHS,
                    "batch_size": 8,
                    "initial_lr": 2e-3,
                    "lr_warmup_epochs": 1,
                    "average_best_models": False,
                    "seed": 0,
                },
            }
        )
        done = service.wait(job["id"], timeout=1500)
        assert done["status"] == "succeeded", service.events(job["id"])
        _learned[service.base_url] = done
    return _learned[service.base_url]
