"""How dataset problems are collected and reported, the same way for every format.

A problem is a dict `{"file", "problem", "severity", "code"}`: `file` names where it is (relative to
the dataset root, or a split and row for Hugging Face datasets), `problem` says what is wrong in words,
`severity` is "error" (the dataset cannot be trained on) or "warning" (it was fixed or is worth
knowing), and `code` is a stable machine-readable name for the kind of problem (`ERROR_CODES`,
`WARNING_CODES`). Errors are listed one by one (up to `MAX_ERRORS`); warnings are aggregated per
kind, with a few examples, and carry `file` ".".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from app.errors import DatasetError

if TYPE_CHECKING:
    from app.datasets.pipeline import SplitStats

MAX_ERRORS = 50
MAX_EXAMPLES = 3

ErrorCode = Literal[
    "format_not_recognised",  # no known format in the folder
    "ambiguous_format",  # the files fit several formats
    "ambiguous_layout",  # several candidates for one file (e.g. several YAML files)
    "no_split",  # a training or validation split cannot be found
    "missing_file",  # the dataset folder, an annotation file, an images folder or data.yaml is missing
    "outside_dataset",  # a path or symlink that leads out of its folder
    "remote_data_files",  # a dataset card names data files by URL (http://, hf://, s3://, ...)
    "unreadable_file",  # an annotation, label, list or data file cannot be read or does not parse
    "file_too_large",  # an annotation, metadata or YAML file is larger than its limit (named)
    "yaml_too_complex",  # a YAML file's aliases expand too far (a "billion laughs") or recurse
    "bad_schema",  # a file parses but lacks required keys or columns, or they have the wrong type
    "bad_option",  # a dataset option (e.g. bbox_format) has a value that is not allowed
    "no_classes",  # there are no classes to train
    "bad_class_list",  # class names or categories are malformed, duplicated or disagree between splits
    "unknown_class",  # a box's class or category is not one of the classes
    "empty_split",  # a split has no images
    "missing_image",  # an image that is listed does not exist
    "unreadable_image",  # not an image, too large to decode safely, or without pixels
    "unsupported_image",  # an image format training cannot read (e.g. GIF)
    "duplicate_image",  # an image id or image name appears twice in a split
    "malformed_annotation",  # an image entry, box or label line that does not have the expected shape
    "no_boxes",  # the training split has no usable box
    "bad_box_share",  # most boxes of a split are outside their image: the box format is wrong
    "too_many_errors",  # stands for the errors beyond MAX_ERRORS
]
WarningCode = Literal[
    "clipped",
    "degenerate",
    "empty_image",
    "size_mismatch",
    "exif_rotated",
    "unknown_empty_category",
    "class_without_boxes",
    "orphan_label",
    "shared_images",
]
ERROR_CODES: tuple[str, ...] = get_args(ErrorCode)
WARNING_CODES: tuple[str, ...] = get_args(WarningCode)
# For a `DatasetError` raised without problem details (none of this package's own errors).
FALLBACK_CODE = "dataset_error"

# kind -> (text for one, text for several with {n}); examples are appended.
WARNING_TEXTS: dict[str, tuple[str, str]] = {
    "clipped": (
        "1 box extended outside its image and was clipped",
        "{n} boxes extended outside their image and were clipped",
    ),
    "degenerate": (
        "1 box had zero or negative area (after clipping) and was dropped",
        "{n} boxes had zero or negative area (after clipping) and were dropped",
    ),
    "empty_image": ("1 image has no boxes", "{n} images have no boxes"),
    "size_mismatch": (
        "1 image has a width/height in its annotations that differs from the file; the file's size is used",
        "{n} images have a width/height in their annotations that differs from the file; "
        "the files' sizes are used",
    ),
    "exif_rotated": (
        "1 image carries an EXIF rotation, which training applies: "
        "check that its boxes match the rotated image",
        "{n} images carry an EXIF rotation, which training applies: "
        "check that their boxes match the rotated images",
    ),
    "unknown_empty_category": (
        "1 category with no boxes is not a training class and was ignored",
        "{n} categories with no boxes are not training classes and were ignored",
    ),
    "class_without_boxes": (
        "1 class has no boxes in the training split",
        "{n} classes have no boxes in the training split",
    ),
    "orphan_label": (
        "1 label file has no image and was ignored",
        "{n} label files have no image and were ignored",
    ),
    "shared_images": (
        "1 validation image is also in the training split",
        "{n} validation images are also in the training split",
    ),
}


def problem(file: str, text: str, code: ErrorCode) -> dict[str, str]:
    """One error in the report's shape."""
    return {"file": file, "problem": text, "severity": "error", "code": code}


def dataset_error(file: str, text: str, code: ErrorCode) -> DatasetError:
    """A `DatasetError` for a single problem that stops the check at once (a layout that is unusable)."""
    return DatasetError(f"{file}: {text}", details=[problem(file, text, code)])


@dataclass
class _Warning:
    count: int = 0
    examples: list[str] = field(default_factory=list)


class InvalidDataset(DatasetError):
    """A `DatasetError` from validation, with what was counted before the errors were raised."""

    def __init__(
        self,
        message: str,
        *,
        details: Any = None,
        class_names: tuple[str, ...] = (),
        stats: dict[str, SplitStats] | None = None,
    ) -> None:
        super().__init__(message, details=details)
        self.class_names = class_names
        self.stats = stats or {}


class Problems:
    """Collects errors (capped) and aggregated warnings, so the user sees every problem at once."""

    def __init__(self) -> None:
        self.errors: list[dict[str, str]] = []
        self.error_count = 0
        self._warnings: dict[str, _Warning] = {}

    def error(self, file: str, text: str, code: ErrorCode) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(problem(file, text, code))

    def warn(self, kind: WarningCode, example: str) -> None:
        entry = self._warnings.setdefault(kind, _Warning())
        entry.count += 1
        if len(entry.examples) < MAX_EXAMPLES:
            entry.examples.append(example)

    def warning_details(self) -> list[dict[str, str]]:
        """One problem per kind of warning, in the order they first occurred."""
        details = []
        for kind, entry in self._warnings.items():
            one, many = WARNING_TEXTS[kind]
            text = one if entry.count == 1 else many.format(n=entry.count)
            if entry.examples:
                more = ", ..." if entry.count > len(entry.examples) else ""
                text += f" (e.g. {', '.join(entry.examples)}{more})"
            details.append({"file": ".", "problem": text, "severity": "warning", "code": kind})
        return details

    def raise_if_errors(
        self, class_names: tuple[str, ...] = (), stats: dict[str, SplitStats] | None = None
    ) -> None:
        """Raise `InvalidDataset` with every error and warning when there is an error."""
        if not self.error_count:
            return
        shown = "; ".join(f"{e['file']}: {e['problem']}" for e in self.errors[:3])
        rest = self.error_count - min(3, len(self.errors))
        message = f"The dataset has {self.error_count} problem{'s' if self.error_count > 1 else ''}: {shown}"
        if rest:
            message += f" (and {rest} more)"
        details = list(self.errors)
        if self.error_count > len(self.errors):
            more = self.error_count - len(self.errors)
            details.append(problem(".", f"{more} more errors not listed", "too_many_errors"))
        details += self.warning_details()
        raise InvalidDataset(message, details=details, class_names=class_names, stats=stats)
