"""The weights folder: published files registered at start and on first use, under their names."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import httpx
import pytest

from app.errors import InvalidInput
from app.migrate import upgrade
from app.ml.types import CheckpointInfo
from app.settings import Settings
from app.testing import backend_resources, serve
from app.weights import folder


class StubInspector:
    """Stands in for the inference process: the file's first bytes say what it is."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, path: Path) -> CheckpointInfo:
        content = path.read_bytes()
        self.calls.append(content.decode())
        if content.startswith(b"bad"):
            raise InvalidInput("not a PyTorch checkpoint")
        model = {b"s": "yolo_nas_s", b"m": "yolo_nas_m"}[content[:1]]
        return CheckpointInfo(
            model=model, num_classes=80, class_names=None, layout="net", processing_params=False
        )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings(home=tmp_path / "home")
    settings.ensure_dirs()
    upgrade(settings.database_url)
    return settings


def test_published_names_are_registered_under_them(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    inspector = StubInspector()
    assert folder.sync_folder(settings, inspector) == [] and inspector.calls == []
    weights_dir = settings.weights_dir
    (weights_dir / "yolo_nas_s_coco.pth").write_bytes(b"s one")
    (weights_dir / "yolo_nas_m_coco.pth").write_bytes(b"s in the wrong file")
    (weights_dir / "yolo_nas_l_objects365.pth").write_bytes(b"bad")
    (weights_dir / "my_model.pth").write_bytes(b"s not a published name")
    with caplog.at_level(logging.WARNING):
        [registered] = folder.sync_folder(settings, inspector)
    assert (registered.name, registered.model, registered.source, registered.pretrained) == (
        "yolo_nas_s_coco.pth",
        "yolo_nas_s",
        "folder",
        "coco",
    )
    assert registered.classes == [f"class_{i}" for i in range(80)]  # the stub names none
    assert sorted(inspector.calls) == ["bad", "s in the wrong file", "s one"]
    assert "yolo_nas_m_coco.pth" in caplog.text and "yolo_nas_l_objects365.pth" in caplog.text
    assert (weights_dir / "store" / f"{registered.id}.pth").read_bytes() == b"s one"
    assert list((weights_dir / ".incoming").iterdir()) == []

    # Again (the next start, or a job asking for it): found, not inspected again.
    inspector.calls.clear()
    again = folder.ensure_published(settings, model="yolo_nas_s", dataset="coco", inspector=inspector)
    assert again.id == registered.id and inspector.calls == []

    # A new file under the same name is new weights; the old ones stay as they were.
    time.sleep(0.01)
    (weights_dir / "yolo_nas_s_coco.pth").write_bytes(b"s two, another file")
    newer = folder.ensure_published(settings, model="yolo_nas_s", dataset="coco", inspector=inspector)
    assert newer.id != registered.id and (weights_dir / "store" / f"{registered.id}.pth").is_file()

    with pytest.raises(InvalidInput) as info:
        folder.ensure_published(settings, model="yolo_nas_m", dataset="coco", inspector=inspector)
    assert "yolo_nas_s checkpoint" in info.value.message and "yolo_nas_m" in info.value.message
    with pytest.raises(InvalidInput) as info:
        folder.ensure_published(settings, model="yolo_nas_m", dataset="objects365", inspector=inspector)
    assert "yolo_nas_m_objects365.pth" in info.value.message and str(weights_dir) in info.value.message


@pytest.mark.slow
def test_the_folder_is_scanned_at_start(tmp_path: Path, standins: Path) -> None:
    home = tmp_path / "home"
    (home / "weights").mkdir(parents=True)
    shutil.copy(standins / "yolo_nas_s_coco.pth", home / "weights" / "yolo_nas_s_coco.pth")
    with (
        backend_resources("sqlite") as backend,
        serve(backend, home, settings={"device": "cpu", "training_spare": False}) as running,
    ):
        deadline = time.monotonic() + 180
        with httpx.Client(base_url=running.base_url, headers=running.headers, timeout=30) as client:
            while True:
                items = client.get("/weights").json()["items"]
                if items or time.monotonic() > deadline:
                    break
                time.sleep(1)
    assert [(w["name"], w["source"], w["pretrained"], w["num_classes"]) for w in items] == [
        ("yolo_nas_s_coco.pth", "folder", "coco", 80)
    ]
