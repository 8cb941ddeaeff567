"""The problem collector every format reports through: codes, aggregated warnings, the error cap."""

from __future__ import annotations

import pytest

from app.datasets.problems import (
    ERROR_CODES,
    MAX_ERRORS,
    WARNING_CODES,
    WARNING_TEXTS,
    InvalidDataset,
    Problems,
)


def test_warnings_are_aggregated_per_kind_with_a_few_examples() -> None:
    problems = Problems()
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        problems.warn("empty_image", name)
    problems.warn("shared_images", "x.jpg")
    assert problems.warning_details() == [
        {
            "file": ".",
            "problem": "4 images have no boxes (e.g. a.jpg, b.jpg, c.jpg, ...)",
            "severity": "warning",
            "code": "empty_image",
        },
        {
            "file": ".",
            "problem": "1 validation image is also in the training split (e.g. x.jpg)",
            "severity": "warning",
            "code": "shared_images",
        },
    ]
    problems.raise_if_errors()  # warnings alone are no reason to refuse a dataset


def test_errors_are_capped_and_raised_with_the_warnings() -> None:
    problems = Problems()
    problems.warn("clipped", "a.jpg box 0")
    for i in range(MAX_ERRORS + 5):
        problems.error(f"f{i}.json", "is broken", "unreadable_file")
    with pytest.raises(InvalidDataset) as info:
        problems.raise_if_errors(("cat",), {})
    details = info.value.details
    assert len(details) == MAX_ERRORS + 2
    assert details[MAX_ERRORS] == {
        "file": ".",
        "problem": "5 more errors not listed",
        "severity": "error",
        "code": "too_many_errors",
    }
    assert details[-1]["code"] == "clipped" and details[-1]["severity"] == "warning"
    assert info.value.message.startswith(f"The dataset has {MAX_ERRORS + 5} problems: f0.json: is broken;")
    assert info.value.class_names == ("cat",)


def test_every_warning_kind_has_its_texts_and_codes_are_distinct() -> None:
    assert set(WARNING_TEXTS) == set(WARNING_CODES)
    assert len(set(ERROR_CODES)) == len(ERROR_CODES) and not set(ERROR_CODES) & set(WARNING_CODES)
