"""The split-building rules every format goes through: clipping, crowd boxes, the bad-box-share rule."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from app.datasets.pipeline import (
    Box,
    ImageFault,
    ImageInfo,
    ImageRecord,
    build_split,
    read_image_header,
    single_subfolder,
)
from app.datasets.problems import Problems


def record(tmp_path: Path, boxes: list[Box], size: tuple[int, int] = (64, 32)) -> ImageRecord:
    path = tmp_path / "a.png"
    Image.new("RGB", size).save(path)
    return ImageRecord(image_id=0, file_name="a.png", path=path, shown="images/a.png", boxes=boxes)


def split(tmp_path: Path, boxes: list[Box]) -> tuple[dict[str, object], Problems]:
    problems = Problems()
    result = build_split(
        "train",
        "src",
        [record(tmp_path, boxes)],
        tmp_path,
        ("a", "b"),
        problems,
        inside=tmp_path,
        box_hint="hint",
    )
    return result.stats.to_dict(), problems


def test_crowd_boxes_are_counted_and_kept(tmp_path: Path) -> None:
    stats, problems = split(tmp_path, [Box(0, 1, 1, 9, 9, "box 0", crowd=True), Box(1, 2, 2, 8, 8, "box 1")])
    assert (stats["boxes"], stats["crowd_boxes"]) == (2, 1)
    assert stats["boxes_per_class"] == {"a": 1, "b": 1}
    assert problems.warning_details() == []


def test_clipped_box_is_named_by_its_image_and_place(tmp_path: Path) -> None:
    _, problems = split(tmp_path, [Box(0, 50, 10, 70, 20, "annotation id 3")])
    [warning] = problems.warning_details()
    assert warning["code"] == "clipped" and "(e.g. images/a.png annotation id 3)" in warning["problem"]


def test_bad_box_share_needs_more_than_half_of_at_least_five_boxes(tmp_path: Path) -> None:
    good, outside = Box(0, 1, 1, 9, 9, "ok"), Box(0, 60, 1, 90, 9, "out")
    _, problems = split(tmp_path, [good, good, outside, outside])  # 2 of 4: too few boxes to judge
    assert problems.error_count == 0
    _, problems = split(tmp_path, [good, good, good, outside, outside, outside])  # 3 of 6: not more
    assert problems.error_count == 0
    _, problems = split(tmp_path, [good, good, outside, outside, outside])  # 3 of 5
    assert [e["code"] for e in problems.errors] == ["bad_box_share"]
    assert problems.errors[0]["problem"].endswith("the box format is probably wrong (hint)")


def test_image_header_from_bytes_and_faults() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (5, 3)).save(buffer, format="PNG")
    buffer.seek(0)
    assert read_image_header(buffer) == ImageInfo(5, 3, "PNG", exif_rotated=False)
    gif = io.BytesIO()
    Image.new("RGB", (5, 3)).save(gif, format="GIF")
    gif.seek(0)
    fault = read_image_header(gif)
    assert isinstance(fault, ImageFault) and fault.code == "unsupported_image"
    assert read_image_header(io.BytesIO(b"nope")) == ImageFault(
        "unreadable_image", "not a readable image (UnidentifiedImageError)"
    )


def test_image_outside_its_folder_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    rec = record(tmp_path, [])
    (outside / "link.png").symlink_to(rec.path)
    rec.path = outside / "link.png"
    problems = Problems()
    build_split("train", "src", [rec], outside, ("a",), problems, inside=tmp_path / "in", box_hint="")
    assert [e["code"] for e in problems.errors] == ["outside_dataset"]


def test_single_subfolder(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / ".hidden").write_text("")
    assert single_subfolder(tmp_path) == tmp_path / "ds"
    (tmp_path / "readme.txt").write_text("")
    assert single_subfolder(tmp_path) is None
