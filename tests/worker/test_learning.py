"""The service really trains: from scratch, on generated shapes, the detector learns to find them."""

from __future__ import annotations

import pytest

from tests.support import Service, make_shapes

pytestmark = [pytest.mark.slow, pytest.mark.backends("sqlite")]

# Measured on the 2-core CI machine (48 training images, 96 px, no pretrained weights): mAP@0.50 stays
# at 0 for the first ~10 epochs, then reaches 0.3-0.5 by epoch 15 and 0.8-0.99 by epochs 20-25.
MIN_MAP = 0.3


def test_training_on_shapes_reaches_a_useful_map(service: Service) -> None:
    make_shapes(service.datasets_dir, "learn-shapes", splits=(("train", 48), ("valid", 16)), seed=11)
    job = service.submit(
        {
            "name": "learning",
            "model": "yolo_nas_s",
            "dataset": {"format": "coco", "path": "learn-shapes"},
            "input_size": [96, 96],
            "training": {
                "max_epochs": 22,
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
    maps = [p["value"] for p in service.metrics(job["id"], name="Valid_mAP@0.50")]
    assert len(maps) == 22
    assert done["best_metric"]["value"] == pytest.approx(max(maps))
    assert max(maps) > MIN_MAP, maps
    # It learned rather than got lucky once: the last epochs are good too.
    assert sum(maps[-3:]) / 3 > MIN_MAP / 2, maps
