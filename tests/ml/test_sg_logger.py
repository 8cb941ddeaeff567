"""`AtomicModelWeightAveraging`: snapshots kept in memory between epochs are copies of the weights,
and the snapshot file is rewritten only when a snapshot changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.ml.sg_setup import prepare_this_process
from tests.ml.conftest import RecordingReporter, run_isolated


def _three_epochs(ckpt_dir: Path) -> dict[str, Any]:
    """Two snapshot slots; the model's weight is 1, then 3, then 5, with mAP 0.5, 0.7, 0.1."""
    prepare_this_process(ckpt_dir / "sg_logs")
    import torch

    from app.ml.checkpoints import load_checkpoint
    from app.ml.layout import AVERAGING_SNAPSHOTS
    from app.ml.sg_logger import AtomicModelWeightAveraging, reporting_to, wait_for_checkpoints

    path = ckpt_dir / AVERAGING_SNAPSHOTS
    model = torch.nn.Linear(1, 1, bias=False)
    averages: list[float] = []
    files: list[tuple[int, list[int | None]]] = []  # the file's inode and snapshot epochs per epoch
    reporter = RecordingReporter()
    with reporting_to(reporter):
        averaging = AtomicModelWeightAveraging(
            str(ckpt_dir), greater_is_better=True, metric_to_watch="mAP", number_of_models_to_average=2
        )
        for epoch, (weight, value) in enumerate([(1.0, 0.5), (3.0, 0.7), (5.0, 0.1)], start=1):
            with torch.no_grad():
                model.weight.fill_(weight)  # training goes on in place, as SG's does
            averaging.epoch = epoch
            average = averaging.get_average_model(model, validation_results_dict={"mAP": value})
            averages.append(float(average["weight"]))
            wait_for_checkpoints()
            on_disk = load_checkpoint(path)
            files.append((path.stat().st_ino, list(on_disk["snapshots_epoch"])))
    return {"averages": averages, "files": files, "lease_checks": reporter.lease_checks}


def test_snapshots_are_copies_and_an_unchanged_epoch_writes_nothing(tmp_path: Path) -> None:
    out = run_isolated(_three_epochs, tmp_path)
    # Epoch 3 (mAP 0.1) beats no snapshot: the average stays that of weights 1 and 3. Had a snapshot
    # been the live tensor, the weight set to 3 and then 5 would have moved it.
    assert out["averages"] == [1.0, 2.0, 2.0]
    (ino1, epochs1), (ino2, epochs2), (ino3, epochs3) = out["files"]
    assert (epochs1, epochs2, epochs3) == ([1, None], [1, 2], [1, 2])
    assert ino1 != ino2 and ino3 == ino2  # a new file for epochs 1 and 2, none for epoch 3
    assert out["lease_checks"] == 3  # the empty file at the start, then epochs 1 and 2
