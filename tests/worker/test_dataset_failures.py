"""Datasets that cannot be used fail their job fast, before a model is built, naming file and problem."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import Service, load_annotations, make_shapes, save_annotations, tiny_spec


def _missing_image(root: Path) -> str:
    victim = sorted((root / "train").glob("*.jpg"))[0]
    victim.unlink()
    return victim.name


def _unreadable_json(root: Path) -> str:
    (root / "train" / "_annotations.coco.json").write_text("{not json")
    return "_annotations.coco.json"


def _unknown_category(root: Path) -> str:
    data = load_annotations(root)
    data["annotations"][0]["category_id"] = 42
    save_annotations(root, data)
    return "42"


def _no_classes(root: Path) -> str:
    data = load_annotations(root)
    data["categories"] = []
    data["annotations"] = []
    save_annotations(root, data)
    return "class"


def _empty_split(root: Path) -> str:
    data = load_annotations(root, "valid")
    data["images"] = []
    data["annotations"] = []
    save_annotations(root, data, "valid")
    return "valid"


CASES: dict[str, Callable[[Path], str]] = {
    "missing_image": _missing_image,
    "unreadable_json": _unreadable_json,
    "unknown_category": _unknown_category,
    "no_classes": _no_classes,
    "empty_split": _empty_split,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_dataset_fails_the_job_with_a_message(service: Service, case: str) -> None:
    root = make_shapes(service.datasets_dir, f"bad-{case}", splits=(("train", 6), ("valid", 3)))
    needle = CASES[case](root)
    job = service.submit(tiny_spec(root.name))
    done: dict[str, Any] = service.wait(job["id"], timeout=120)
    assert done["status"] == "failed"
    assert done["error"]["reason"] == "dataset_error"
    message = done["error"]["message"]
    assert needle in message, message
    # It failed before a model was built: no super-gradients run directory, no checkpoints.
    assert not any(k.startswith("ckpt") for k in done["artifacts"])
    assert not (Path(done["job_dir"]) / "checkpoints").exists()
    assert any(e["level"] == "error" for e in service.events(job["id"]))
