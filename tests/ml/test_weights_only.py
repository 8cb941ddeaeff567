"""A malicious checkpoint (a pickle whose `__reduce__` runs a command) is refused by the real load
paths of training and prediction, even when the operator's environment asks torch for unsafe loading
(`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`): children get `app.ml.sg_setup.child_environment`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.ml.model_server import ModelServer, ModelServerError
from app.ml.sg_setup import FORCE_WEIGHTS_ONLY, child_environment, sg_environment
from tests.weights.standins import Payload

ROOT = Path(__file__).resolve().parents[2]
UNSAFE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"

# What super-gradients does with a job's init checkpoint or a predicting checkpoint (`models.get` with
# `checkpoint_path`, whose torch.load passes no weights_only), and what torch.hub's loader does
# (weights_only=False). Prints, for each, whether the payload ran (the canary appeared).
_LOADS = """
import json, os, sys, torch
path, canary = sys.argv[1], sys.argv[2]
def sg_models_get():
    from super_gradients.training import models
    models.get("yolo_nas_s", num_classes=5, checkpoint_path=path, pretrained_weights=None)
ran = {}
for name, load in [
    ("explicit_unsafe", lambda: torch.load(path, map_location="cpu", weights_only=False)),
    ("sg_models_get", sg_models_get),
]:
    try:
        load()
    except Exception:
        pass
    ran[name] = os.path.exists(canary)
    if ran[name]:
        os.remove(canary)
sys.__stdout__.write("RESULT" + json.dumps(ran) + "\\n")
"""


def evil_checkpoint(directory: Path) -> tuple[Path, Path]:
    """A torch checkpoint whose unpickling creates `canary`; returns both paths."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    canary = directory / "canary"
    path = directory / "evil.pth"
    torch.save({"net": Payload(canary)}, path)
    return path, canary


def _payload_ran(path: Path, canary: Path, env: dict[str, str]) -> dict[str, bool]:
    """For each load of `_LOADS` in a child with `env`: whether the payload ran."""
    command = [sys.executable, "-c", _LOADS, str(path), str(canary)]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), None)
    assert line is not None, out.stderr[-3000:]
    result: dict[str, bool] = json.loads(line[len("RESULT") :])
    return result


def test_sg_loads_in_a_child_refuse_a_malicious_checkpoint_whatever_the_parent_says(tmp_path: Path) -> None:
    path, canary = evil_checkpoint(tmp_path / "files")
    unsafe_parent = {**os.environ, UNSAFE: "1"}
    env = child_environment(tmp_path / "sg", parent=unsafe_parent)
    assert _payload_ran(path, canary, env) == {"explicit_unsafe": False, "sg_models_get": False}

    # The same loads with the parent's environment passed through would have run it: the test bites.
    passed_through = {**unsafe_parent, **sg_environment(tmp_path / "sg")}
    del passed_through[FORCE_WEIGHTS_ONLY]
    assert _payload_ran(path, canary, passed_through) == {"explicit_unsafe": True, "sg_models_get": True}


def test_the_inference_process_refuses_a_malicious_checkpoint_under_an_unsafe_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, canary = evil_checkpoint(tmp_path / "files")
    monkeypatch.setenv(UNSAFE, "1")
    server = ModelServer(log_file=tmp_path / "inference.log", sg_log_dir=tmp_path / "sg", capacity=1)
    try:
        server.call("stats", timeout=120)
        assert server.pid is not None
        environ = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
        assert f"{FORCE_WEIGHTS_ONLY}=1".encode() in environ
        assert not [v for v in environ if v.startswith(UNSAFE.encode() + b"=")]
        png = io.BytesIO()
        Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(png, format="PNG")
        with pytest.raises(ModelServerError) as info:
            server.call(
                "predict",
                timeout=120,
                model="yolo_nas_s",
                checkpoint=str(path),
                class_names=None,
                uploads=[("blank.png", png.getvalue())],
                max_pixels=32 * 32,
                conf=0.5,
                iou=0.5,
                image_format=None,
            )
        assert info.value.kind == "load", info.value.message
        with pytest.raises(ModelServerError) as info:
            server.call("inspect", timeout=120, path=str(path))
        assert info.value.kind == "invalid", info.value.message
    finally:
        server.close()
    assert not canary.exists(), "the pickle's payload ran"
