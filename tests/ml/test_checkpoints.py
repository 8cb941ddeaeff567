"""`CheckpointPublisher`: files written in the caller's thread, put in place in the background, in
order, only under the lease; a failure reaches the caller at its next save or wait and stops every
later file."""

from __future__ import annotations

import json
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import app.failpoints
from app.ml.checkpoints import CheckpointPublisher, load_checkpoint
from app.ml.layout import is_temp_file
from app.ml.types import LeaseLost

# Long enough never to run out in a passing test; a lease check still blocked then says the test's
# own release never came.
BLOCK_SECONDS = 30.0


class Lease:
    """A `holds_lease` that records each call and can hold calls until released."""

    def __init__(self, *, held: bool = True, blocked: bool = False) -> None:
        self.held = held
        self.calls = 0
        self.entered = threading.Event()
        self._released = threading.Event()
        if not blocked:
            self._released.set()

    def release(self) -> None:
        self._released.set()

    def __call__(self) -> bool:
        self.calls += 1
        self.entered.set()
        if not self._released.wait(BLOCK_SECONDS):
            raise AssertionError("the test never released the lease check")
        return self.held


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4,), value)}


def _value(path: Path) -> float:
    return float(load_checkpoint(path)["w"][0])


def _temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if is_temp_file(p))


def _publisher(request: pytest.FixtureRequest) -> CheckpointPublisher:
    publisher = CheckpointPublisher()
    request.addfinalizer(lambda: _close_quietly(publisher))
    return publisher


def _held_in_the_lease_check(publisher: CheckpointPublisher, path: Path, value: float) -> Lease:
    """Save `value` to `path` and return once its lease check, in the background, holds it there."""
    lease = Lease(blocked=True)
    publisher.save(_state(value), path, holds_lease=lease)
    assert lease.entered.wait(BLOCK_SECONDS)
    return lease


def _close_quietly(publisher: CheckpointPublisher) -> None:
    try:
        publisher.close()
    except LeaseLost:
        pass


def test_files_go_in_place_in_order_keeping_the_previous(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    publisher = _publisher(request)
    latest, previous, best = (
        tmp_path / "ckpt_latest.pth",
        tmp_path / "ckpt_latest.previous.pth",
        tmp_path / "b.pth",
    )
    order: list[str] = []

    def lease(name: str) -> Callable[[], bool]:
        return lambda: order.append(name) is None

    for epoch in (1, 2, 3):
        publisher.save(_state(epoch), latest, holds_lease=lease(f"latest{epoch}"), keep_previous_as=previous)
        publisher.save(_state(10 * epoch), best, holds_lease=lease(f"best{epoch}"))
    publisher.wait()
    assert order == ["latest1", "best1", "latest2", "best2", "latest3", "best3"]
    assert (_value(latest), _value(previous), _value(best)) == (3.0, 2.0, 30.0)
    assert _temps(tmp_path) == []


def test_save_returns_before_the_file_is_in_place(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    publisher = _publisher(request)
    path = tmp_path / "ckpt_latest.pth"
    # The lease check runs in the background and is held there: the caller is already back.
    lease = _held_in_the_lease_check(publisher, path, 1.0)
    assert not path.exists() and len(_temps(tmp_path)) == 1
    lease.release()
    publisher.wait(path)
    assert _value(path) == 1.0 and _temps(tmp_path) == []


def test_a_file_has_one_save_in_flight(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    publisher = _publisher(request)
    path = tmp_path / "ckpt_latest.pth"
    first = _held_in_the_lease_check(publisher, path, 1.0)
    second = threading.Thread(
        target=publisher.save, args=(_state(2.0), path), kwargs={"holds_lease": Lease()}
    )
    second.start()
    second.join(0.5)
    # The second save waits for the first to be in place before writing its temporary file.
    assert second.is_alive() and len(_temps(tmp_path)) == 1
    first.release()
    second.join(BLOCK_SECONDS)
    publisher.wait()
    assert _value(path) == 2.0 and _temps(tmp_path) == []


def test_a_lost_lease_is_raised_once_and_drops_every_later_file(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    publisher = _publisher(request)
    latest, best = tmp_path / "ckpt_latest.pth", tmp_path / "ckpt_best.pth"
    latest.write_bytes(b"the previous epoch's")
    lost = Lease(held=False, blocked=True)
    later = Lease()
    publisher.save(_state(1.0), latest, holds_lease=lost)
    publisher.save(_state(1.0), best, holds_lease=later)  # queued behind the failing one
    lost.release()
    with pytest.raises(LeaseLost, match="ckpt_latest.pth not replaced"):
        publisher.wait()
    assert later.calls == 0 and not best.exists()
    assert latest.read_bytes() == b"the previous epoch's" and _temps(tmp_path) == []
    # Nothing more is saved after a failure; close() does not raise what was raised already.
    with pytest.raises(LeaseLost):
        publisher.save(_state(2.0), best, holds_lease=later)
    publisher.wait()
    publisher.close()
    assert not best.exists() and _temps(tmp_path) == []


def test_close_raises_a_failure_not_raised_yet(tmp_path: Path) -> None:
    publisher = CheckpointPublisher()
    publisher.save(_state(1.0), tmp_path / "average_model.pth", holds_lease=Lease(held=False))
    with pytest.raises(LeaseLost, match="average_model.pth not replaced"):
        publisher.close()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(params=["by name", "through the failpoint's writer"])
def write_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Both ways `_write_temporary` saves: by file name, or through a Python writer while the
    `checkpoint_write` failpoint is armed (here for another job, so it never fires)."""
    if request.param != "by name":
        point = {"checkpoint_write": {"action": "crash", "job_name": "some other job"}}
        monkeypatch.setenv(app.failpoints.ENV_VAR, json.dumps(point))
    app.failpoints.reset()
    yield request.param
    monkeypatch.delenv(app.failpoints.ENV_VAR, raising=False)
    app.failpoints.reset()


def test_checkpoints_carry_no_zip_checksums_and_load(
    tmp_path: Path, request: pytest.FixtureRequest, write_path: str
) -> None:
    publisher = _publisher(request)
    path = tmp_path / "ckpt_latest.pth"
    publisher.save(_state(3.0), path, holds_lease=Lease())
    publisher.wait()
    with zipfile.ZipFile(path) as archive:
        assert {info.CRC for info in archive.infolist()} == {0}
    # A torch that checked the checksums on load would refuse this file: this is where it would show.
    assert _value(path) == 3.0
    # torch's process-wide default is back for every other torch.save.
    assert torch.serialization.get_crc32_options() is True


def test_torch_load_does_not_check_zip_checksums(tmp_path: Path) -> None:
    """Why the checkpoints carry none: with them, a data byte changed on disk still loads silently."""
    path = tmp_path / "with_checksums.pth"
    torch.save({"w": torch.zeros(4096)}, path)
    with zipfile.ZipFile(path) as archive:
        data = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
        assert data.CRC != 0 and data.compress_type == zipfile.ZIP_STORED
    raw = bytearray(path.read_bytes())
    # The record's data starts after its local header (30 bytes, the name, the extra field).
    header = data.header_offset
    name_len = int.from_bytes(raw[header + 26 : header + 28], "little")
    extra_len = int.from_bytes(raw[header + 28 : header + 30], "little")
    start = header + 30 + name_len + extra_len
    raw[start + 8] = 0x41
    path.write_bytes(bytes(raw))
    assert int((load_checkpoint(path)["w"] != 0).sum()) == 1
