"""The service really trains: from scratch, on generated shapes, the detector learns to find them."""

from __future__ import annotations

import pytest

from tests.support import Service
from tests.worker.helpers import LEARN_EPOCHS, learned_job

# One worker runs both learning tests (with pytest-xdist): they share `learned_job`'s training.
pytestmark = [pytest.mark.slow, pytest.mark.backends("sqlite"), pytest.mark.xdist_group("learned_job")]

# Measured on the 2-core CI machine (48 training images, 96 px, no pretrained weights): mAP@0.50 stays
# at 0 for the first ~10 epochs, then reaches 0.3-0.5 by epoch 15 and 0.8-0.99 by epochs 20-25.
MIN_MAP = 0.3


def test_training_on_shapes_reaches_a_useful_map(service: Service) -> None:
    done = learned_job(service)  # shared with tests/weights/test_learning.py
    maps = [p["value"] for p in service.metrics(done["id"], name="Valid_mAP@0.50")]
    assert len(maps) == LEARN_EPOCHS
    assert done["best_metric"]["value"] == pytest.approx(max(maps))
    assert max(maps) > MIN_MAP, maps
    # It learned rather than got lucky once: the last epochs are good too.
    assert sum(maps[-3:]) / 3 > MIN_MAP / 2, maps
