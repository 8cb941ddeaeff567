"""What a fork server has done before its first fork (`app.ml.forking.import_before_forking`), so that
a forked child has nothing left to import or compose once it is given its job."""

from __future__ import annotations

from pathlib import Path

from tests.ml.conftest import run_fresh
from worker.runner import TRAIN_PROCESS_MODULE

# A fresh interpreter, as a fork server is.
_BEFORE_FORKING = """
import json, sys
from pathlib import Path
from app.ml.sg_setup import prepare_this_process
prepare_this_process(Path(sys.argv[1]))
from app.ml.forking import import_before_forking
before = set(sys.modules)
threads = import_before_forking(also=[sys.argv[2]])
import torch
from super_gradients.common.environment import cfg_utils
from super_gradients.training import models

composed = []
cfg_utils.load_recipe = lambda *a, **k: composed.append(k["config_name"])
for name in ("yolo_nas_s", "yolo_nas_m", "yolo_nas_l"):
    models.get(name, num_classes=2, pretrained_weights=None)
print(json.dumps({
    "imported": sys.argv[2] in set(sys.modules) - before,
    "threads": threads,
    "torch_threads": torch.get_num_threads(),
    "composed": composed,
}))
"""


def test_the_fork_server_imports_what_its_children_run_and_composes_every_model(tmp_path: Path) -> None:
    result = run_fresh(_BEFORE_FORKING, str(tmp_path / "logs"), TRAIN_PROCESS_MODULE)
    assert result["imported"] is True
    # Every model a job may name builds without composing its YAML again (each took 0.1-0.2 s).
    assert result["composed"] == []
    # Imported with one thread (no OpenMP pool to carry over a fork); the default is given back.
    assert result["torch_threads"] == 1 and result["threads"] >= 1
