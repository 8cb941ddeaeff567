"""The one super-gradients environment and the one device rule (`app.ml.sg_setup`), and fp16 from the
model's device (`app.ml.inference.build_pipeline`). Fast: no training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app.ml.sg_setup import (
    FORCE_WEIGHTS_ONLY,
    TRAINING_MALLOC,
    UNSAFE_LOAD_VARIABLES,
    child_environment,
    choose_device,
    prepare_this_process,
    sg_environment,
    training_environment,
)
from app.settings import Settings
from tests.ml.conftest import run_fresh


def test_cuda_without_cuda_is_an_error_that_says_so() -> None:
    with pytest.raises(ValueError, match="'cuda' requested but CUDA is not available"):
        choose_device("cuda", cuda_available=False)


@pytest.mark.parametrize(
    ("requested", "cuda_available", "device"),
    [
        ("auto", True, "cuda"),
        ("auto", False, "cpu"),
        ("cuda", True, "cuda"),
        ("cpu", True, "cpu"),
        ("cpu", False, "cpu"),
    ],
)
def test_device_rule(requested: str, cuda_available: bool, device: str) -> None:
    assert choose_device(requested, cuda_available=cuda_available) == device


def test_unknown_device_is_an_error() -> None:
    with pytest.raises(ValueError, match="not one of"):
        choose_device("tpu", cuda_available=True)


def test_sg_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONSOLE_LOG_LEVEL", raising=False)
    env = sg_environment(tmp_path / "logs")
    assert env == {
        "CRASH_HANDLER": "FALSE",
        "CONSOLE_LOG_LEVEL": "WARNING",
        "SUPER_GRADIENTS_LOG_DIR": str(tmp_path / "logs"),
        "PYTHONUNBUFFERED": "1",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1",
    }
    assert (tmp_path / "logs").is_dir()
    assert sg_environment(tmp_path, console_level="ERROR")["CONSOLE_LOG_LEVEL"] == "ERROR"
    monkeypatch.setenv("CONSOLE_LOG_LEVEL", "DEBUG")  # the operator's choice wins
    assert sg_environment(tmp_path, console_level="ERROR")["CONSOLE_LOG_LEVEL"] == "DEBUG"


def test_prepare_this_process_keeps_what_a_parent_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("CRASH_HANDLER", "CONSOLE_LOG_LEVEL", "PYTHONUNBUFFERED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SUPER_GRADIENTS_LOG_DIR", str(tmp_path / "from-parent"))
    prepare_this_process(tmp_path / "job" / "logs")
    assert os.environ["SUPER_GRADIENTS_LOG_DIR"] == str(tmp_path / "from-parent")
    assert (tmp_path / "from-parent").is_dir()
    assert os.environ["CRASH_HANDLER"] == "FALSE" and os.environ["CONSOLE_LOG_LEVEL"] == "WARNING"


def test_a_child_never_inherits_unsafe_loading(tmp_path: Path) -> None:
    parent = {
        "PATH": "/usr/bin",
        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
        "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "0",
        "SGJOBS_HOME": "/elsewhere",
    }
    env = child_environment(tmp_path / "logs", extra={"SGJOBS_HOME": "/srv/sgjobs"}, parent=parent)
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in env
    assert env["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
    assert env["PATH"] == "/usr/bin" and env["SGJOBS_HOME"] == "/srv/sgjobs"
    assert env["SUPER_GRADIENTS_LOG_DIR"] == str(tmp_path / "logs")


def test_the_child_environment_defaults_to_this_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setenv("SGJOBS_SOMETHING", "kept")
    env = child_environment(tmp_path, console_level="ERROR")
    assert not set(UNSAFE_LOAD_VARIABLES) & set(env)
    assert env[FORCE_WEIGHTS_ONLY] == "1" and env["SGJOBS_SOMETHING"] == "kept"


def test_a_training_process_gets_malloc_tuned_unless_the_operator_said_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in TRAINING_MALLOC:
        monkeypatch.delenv(name, raising=False)
    settings = Settings(home=tmp_path / "home")
    env = training_environment(settings, tmp_path / "logs", extra={"SGJOBS_DEVICE": "cpu"})
    assert {name: env[name] for name in TRAINING_MALLOC} == TRAINING_MALLOC
    assert env["SGJOBS_HOME"] == str(settings.home) and env["SGJOBS_DEVICE"] == "cpu"
    assert env[FORCE_WEIGHTS_ONLY] == "1"
    # The inference process keeps glibc's defaults: its evicted models' memory must go back.
    assert not set(TRAINING_MALLOC) & set(child_environment(tmp_path / "logs"))
    # An operator's own value stays; the setting turns the tuning off.
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert training_environment(settings, tmp_path / "logs")["MALLOC_TRIM_THRESHOLD_"] == "131072"
    off = settings.model_copy(update={"training_malloc_tuning": False})
    assert training_environment(off, tmp_path / "logs")["MALLOC_TRIM_THRESHOLD_"] == "131072"
    assert "MALLOC_MMAP_MAX_" not in training_environment(off, tmp_path / "logs")


# Allocates and frees a 48 MiB buffer ten times (over glibc's largest adaptive mmap threshold, as a
# big batch's activations are) and prints the page faults that took, after a first round.
_REALLOCATE = """
import resource
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = bytearray(48 << 20)
del block
before = faults()
for _ in range(10):
    block = bytearray(48 << 20)
    del block
print(faults() - before)
"""


def _reallocation_faults(env: dict[str, str]) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _REALLOCATE], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return int(done.stdout)


def test_tuned_malloc_keeps_freed_memory_for_the_next_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in TRAINING_MALLOC:
        monkeypatch.delenv(name, raising=False)
    # glibc's defaults map and unmap the buffer each time: every page faults back in (12,288 a round).
    assert _reallocation_faults(dict(os.environ)) > 10 * 10_000
    # Tuned, the heap keeps the memory: the rounds reuse pages that are already there.
    tuned = training_environment(Settings(home=tmp_path / "home"), tmp_path / "logs")
    assert _reallocation_faults(tuned) < 1_000


def test_prepare_this_process_forces_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setenv(FORCE_WEIGHTS_ONLY, "0")
    prepare_this_process(tmp_path / "logs")
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
    assert os.environ[FORCE_WEIGHTS_ONLY] == "1"


class _FakeModel:
    """What build_pipeline touches of an SG model."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.fp16: bool | None = None

    def parameters(self) -> Any:
        yield SimpleNamespace(device=SimpleNamespace(type=self.device_type))

    def _get_pipeline(self, *, conf: float, iou: float, fuse_model: bool, fp16: bool) -> str:
        self.fp16 = fp16
        return "pipeline"


_FakeModel._get_pipeline.cache_clear = lambda: None  # type: ignore[attr-defined]


@pytest.mark.parametrize(("device_type", "fp16"), [("cpu", False), ("cuda", True)])
def test_fp16_follows_the_device_the_model_is_on(device_type: str, fp16: bool) -> None:
    from app.ml.inference import build_pipeline

    model = _FakeModel(device_type)
    assert build_pipeline(model) == "pipeline"
    assert model.fp16 is fp16


def test_inference_process_refuses_cuda_without_cuda(tmp_path: Path) -> None:
    """An explicit "cuda" on a machine without CUDA: every request is told so (no silent CPU)."""
    probe = "import torch; print(torch.cuda.is_available())"
    has_cuda = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    if has_cuda.stdout.strip() == "True":
        pytest.skip("this machine has CUDA")
    from app.ml.model_server import ModelServer, ModelServerError

    server = ModelServer(
        log_file=tmp_path / "inference.log", sg_log_dir=tmp_path / "sg", capacity=1, device="cuda"
    )
    try:
        for _ in range(2):  # the process stays up and answers each request
            with pytest.raises(ModelServerError) as info:
                server.call("stats", timeout=60)
            assert info.value.kind == "device"
            assert "CUDA is not available" in info.value.message
        assert server.starts == 1
    finally:
        server.close()
    assert "cannot serve" in (tmp_path / "inference.log").read_text()


# Run in a fresh interpreter: super-gradients' import has side effects, and this pytest process may
# have imported it (and remembered its architecture parameters) already.
_REMEMBERED_ARCH_PARAMS = """
import json, sys
from pathlib import Path
from app.ml.sg_setup import prepare_this_process, remember_arch_params
prepare_this_process(Path(sys.argv[1]))
import torch
from super_gradients.common.environment import cfg_utils
from super_gradients.training import models
from super_gradients.training.models import arch_params_factory

def build():
    torch.manual_seed(0)
    return models.get("yolo_nas_s", num_classes=3, pretrained_weights=None).state_dict()

composed = []
compose = cfg_utils.load_recipe
cfg_utils.load_recipe = lambda *a, **k: composed.append(k["config_name"]) or compose(*a, **k)
before = build()
expected = arch_params_factory.get_arch_params("yolo_nas_m_arch_params")
remember_arch_params(preload=["yolo_nas_s", "yolo_nas_m"])
remember_arch_params(preload=["yolo_nas_s"])
preloaded = list(composed)
after = build()
got = arch_params_factory.load_arch_params(config_name="yolo_nas_m_arch_params")
got.heads.NDFLHeads.num_classes = 7  # a caller's changes stay in its copy
again = arch_params_factory.load_arch_params(config_name="yolo_nas_m_arch_params")
print(json.dumps({
    "composed": composed,
    "preloaded": preloaded,
    "same_model": list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before),
    "equal": arch_params_factory.get_arch_params("yolo_nas_m_arch_params") == expected,
    "again_classes": again.heads.NDFLHeads.num_classes,
}))
"""


def test_architecture_parameters_are_composed_once_per_process(tmp_path: Path) -> None:
    """After `remember_arch_params`, building a model composes nothing (Hydra's YAML was the slowest
    step of a warm job start), and builds the very same model as before."""
    result = run_fresh(_REMEMBERED_ARCH_PARAMS, str(tmp_path / "logs"))
    s, m = "arch_params/yolo_nas_s_arch_params", "arch_params/yolo_nas_m_arch_params"
    # Composed without the cache for the first build and the first `m`, then once each by the preload
    # (the second call is a no-op); never again afterwards.
    assert result["preloaded"] == [s, m, s, m]
    assert result["composed"] == result["preloaded"]
    assert result["same_model"] is True
    assert result["equal"] is True
    assert result["again_classes"] == 80
