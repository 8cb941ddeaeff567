"""Dataset registry: queries and state changes (they take a session and never commit), and how a job
spec's dataset (a path or a registered id) becomes a folder plus format options."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.datasets.archive import ArchiveLimits, extract_archive
from app.datasets.coco import SplitRef
from app.datasets.formats import DatasetOptions, detect_format, validate_dataset
from app.datasets.hf import default_cache_root
from app.datasets.models import Dataset, DatasetStatus
from app.db import utcnow
from app.errors import Conflict, DatasetError, InvalidInput, NotFound
from app.jobs.models import Job, JobStatus, new_id
from app.jobs.schemas import DatasetSpec
from app.settings import Settings

UPLOADS = "uploads"


@dataclass(frozen=True)
class ResolvedDataset:
    """Where a job's dataset is and how to read it."""

    root: Path
    options: DatasetOptions
    dataset_id: str | None


def _field_error(loc: Sequence[str], message: str) -> InvalidInput:
    return InvalidInput(message, details=[{"loc": ["body", *loc], "msg": message, "type": "value_error"}])


def limits(settings: Settings) -> ArchiveLimits:
    """The upload limits from the settings."""
    return ArchiveLimits(
        max_bytes=settings.upload_max_bytes,
        max_uncompressed_bytes=settings.upload_max_uncompressed_bytes,
        max_members=settings.upload_max_members,
        max_ratio=settings.upload_max_ratio,
    )


def cache_root(settings: Settings, root: Path) -> Path:
    """Where a dataset's decoded images are cached: inside it when writable, else under the home."""
    return default_cache_root(root, settings.home / "cache" / "datasets")


def staging_dir(settings: Settings) -> Path:
    """Uploads are written here first: same filesystem as the datasets, so a 2 GB file never sits in /tmp."""
    path = settings.datasets_dir / UPLOADS / ".incoming"
    path.mkdir(parents=True, exist_ok=True)
    return path


def options_for(
    dataset_format: str, spec: DatasetSpec | None, stored: dict[str, Any] | None
) -> DatasetOptions:
    """Format options from a job spec (when there is one) over those stored with a registered dataset."""
    stored = stored or {}
    if spec is None:
        return DatasetOptions(format=dataset_format, bbox_format=stored.get("bbox_format"))
    return DatasetOptions(
        format=dataset_format,
        coco_train=SplitRef(spec.train.images, spec.train.annotations) if spec.train else None,
        coco_val=SplitRef(spec.val.images, spec.val.annotations) if spec.val else None,
        bbox_format=spec.bbox_format or stored.get("bbox_format"),
        hf_train=spec.splits.train if spec.splits else None,
        hf_val=spec.splits.val if spec.splits else None,
        data_yaml=spec.data_yaml,
    )


def dataset_root(settings: Settings, dataset: Dataset) -> Path:
    """The registered dataset's folder (it must still be inside the datasets directory)."""
    base = settings.datasets_dir.resolve()
    root = (base / dataset.path).resolve()
    if not root.is_relative_to(base) or not root.is_dir():
        raise DatasetError(
            f"the files of dataset {dataset.id!r} are missing",
            details=[{"file": dataset.path, "problem": "dataset folder is missing", "severity": "error"}],
        )
    return root


def resolve_spec(
    session: Session, *, settings: Settings, spec: DatasetSpec, resolve_path: Any
) -> ResolvedDataset:
    """A job spec's dataset as a folder and options. `resolve_path(settings, relative)` checks paths.

    Raises `InvalidInput` with the field at fault (an unknown id, a format or option that does not
    fit the registered dataset).
    """
    if spec.id is None:
        assert spec.path is not None and spec.format is not None
        return ResolvedDataset(resolve_path(settings, spec.path), options_for(spec.format, spec, None), None)
    dataset = session.get(Dataset, spec.id)
    if dataset is None:
        raise _field_error(["dataset", "id"], f"dataset {spec.id!r} is not registered")
    if spec.format is not None and spec.format != dataset.format:
        raise _field_error(
            ["dataset", "format"], f"dataset {spec.id!r} is a {dataset.format} dataset, not {spec.format}"
        )
    misplaced = spec.misplaced_options(dataset.format)
    if misplaced:
        raise _field_error(
            ["dataset", misplaced[0]],
            f"{misplaced[0]} does not apply to {dataset.format} dataset {spec.id!r}",
        )
    try:
        root = dataset_root(settings, dataset)
    except DatasetError as exc:
        raise _field_error(["dataset", "id"], exc.message) from exc
    return ResolvedDataset(root, options_for(dataset.format, spec, dataset.options), dataset.id)


def register_upload(
    session: Session,
    *,
    settings: Settings,
    archive: Path,
    name: str | None,
    bbox_format: str | None,
) -> Dataset:
    """Extract an uploaded archive safely, detect its format, validate it and register it.

    A dataset with errors is still registered (status `invalid`, with its report) so it can be
    inspected; an archive that is refused or whose format is not recognised leaves nothing behind.
    """
    dataset_id = new_id()
    dest = settings.datasets_dir / UPLOADS / dataset_id
    archive_bytes = archive.stat().st_size
    extracted = extract_archive(archive, dest, limits(settings))
    try:
        fmt, base = detect_format(dest)
        if bbox_format is not None and fmt != "hf":
            raise InvalidInput(f"bbox_format applies to Hugging Face datasets only; this one is {fmt}")
        options = {"bbox_format": bbox_format} if bbox_format else {}
        root = base.resolve()
        report = validate_dataset(root, options_for(fmt, None, options), cache_root(settings, root))
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    now = utcnow()
    dataset = Dataset(
        id=dataset_id,
        name=name or dataset_id,
        format=fmt,
        path=root.relative_to(settings.datasets_dir.resolve()).as_posix(),
        options=options,
        status=DatasetStatus.ready if report["ok"] else DatasetStatus.invalid,
        archive_bytes=archive_bytes,
        size_bytes=extracted.bytes,
        file_count=extracted.files,
        classes=report["classes"] or None,
        report=report,
        created_at=now,
        validated_at=now,
    )
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, *, dataset_id: str) -> Dataset:
    """The dataset, or 404."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise NotFound(f"dataset {dataset_id!r} not found")
    return dataset


def list_datasets(session: Session, *, limit: int, offset: int) -> tuple[Sequence[Dataset], int]:
    """Newest first."""
    rows = session.scalars(
        select(Dataset).order_by(Dataset.created_at.desc(), Dataset.id).limit(limit).offset(offset)
    ).all()
    return rows, session.scalar(select(func.count()).select_from(Dataset)) or 0


def validate(session: Session, *, settings: Settings, dataset_id: str, bbox_format: str | None) -> Dataset:
    """Validate again (e.g. with another bbox_format, which is then stored); updates status and report."""
    dataset = get_dataset(session, dataset_id=dataset_id)
    if bbox_format is not None and dataset.format != "hf":
        raise InvalidInput(f"bbox_format applies to Hugging Face datasets only; this one is {dataset.format}")
    options = dict(dataset.options or {})
    if bbox_format is not None:
        options["bbox_format"] = bbox_format
    root = dataset_root(settings, dataset)
    report = validate_dataset(root, options_for(dataset.format, None, options), cache_root(settings, root))
    dataset.options = options
    dataset.report = report
    dataset.classes = report["classes"] or None
    dataset.status = DatasetStatus.ready if report["ok"] else DatasetStatus.invalid
    dataset.validated_at = utcnow()
    session.flush()
    return dataset


def jobs_using(session: Session, *, settings: Settings, dataset: Dataset) -> list[str]:
    """Queued or running jobs that read this dataset (by id, or by a path inside its folder)."""
    folder = (settings.datasets_dir / UPLOADS / dataset.id).resolve()
    users = []
    for job_id, spec in session.execute(
        select(Job.id, Job.spec).where(Job.status.in_((JobStatus.queued, JobStatus.running)))
    ):
        ds = (spec or {}).get("dataset") or {}
        if ds.get("id") == dataset.id:
            users.append(job_id)
        elif isinstance(ds.get("path"), str):
            path = (settings.datasets_dir / ds["path"]).resolve()
            if path == folder or path.is_relative_to(folder):
                users.append(job_id)
    return users


def delete_dataset(session: Session, *, settings: Settings, dataset_id: str) -> Path:
    """Unregister a dataset (409 while a queued or running job uses it); returns the folder to remove
    once the caller has committed."""
    dataset = get_dataset(session, dataset_id=dataset_id)
    users = jobs_using(session, settings=settings, dataset=dataset)
    if users:
        raise Conflict(
            f"dataset {dataset_id!r} is used by {len(users)} queued or running job(s): "
            f"{', '.join(users[:10])}; cancel them or wait for them to finish",
            details=[{"job_id": j} for j in users],
        )
    session.delete(dataset)
    session.flush()
    return settings.datasets_dir / UPLOADS / dataset_id


def remove_files(folder: Path) -> None:
    """Delete an unregistered dataset's folder."""
    shutil.rmtree(folder, ignore_errors=True)
