"""Dataset registry: queries and state changes (they take a session and never commit), and how a job
spec's dataset (a path or a registered id) becomes a folder plus format options."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.auth.principal import Principal, sees, visible
from app.datasets.archive import ArchiveLimits, extract_archive
from app.datasets.coco import SplitRef
from app.datasets.formats import DatasetOptions, detect_format, validate_dataset
from app.datasets.hf import default_cache_root
from app.datasets.models import Dataset, DatasetStatus
from app.datasets.problems import problem
from app.datasets.schemas import DatasetSpec
from app.datasets.stored import delete_upload, fetch_upload, push_upload
from app.db import new_id, release_connection, utcnow
from app.errors import Conflict, DatasetError, InvalidInput, NotFound
from app.paths import UPLOADS_FOLDER, is_inside, real
from app.quotas import check_storage
from app.settings import Settings
from app.storage import StorageError, remote_store

UPLOADS = UPLOADS_FOLDER


@dataclass(frozen=True)
class ResolvedDataset:
    """Where a job's dataset is and how to read it."""

    root: Path
    options: DatasetOptions
    dataset_id: str | None


class DatasetUsers(Protocol):
    """Who reads a dataset now: the ids of queued or running jobs using it (by id, or by a path inside
    its folder). The jobs area implements it and `app.main` wires it in: datasets never imports jobs."""

    def __call__(
        self, session: Session, *, settings: Settings, dataset_id: str, folder: Path
    ) -> list[str]: ...


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


def _is_upload(dataset: Dataset) -> bool:
    uploaded = f"{UPLOADS}/{dataset.id}"
    return dataset.path == uploaded or dataset.path.startswith(f"{uploaded}/")


def needs_pull(settings: Settings, dataset: Dataset) -> bool:
    """Whether `dataset_root` would first download the dataset: an upload this machine lacks, with
    a remote store."""
    return (
        _is_upload(dataset)
        and remote_store(settings) is not None
        and not upload_folder(settings, dataset.id).is_dir()
    )


def dataset_root(settings: Settings, dataset: Dataset) -> Path:
    """The registered dataset's folder (it must still be inside the datasets directory); an upload
    this machine lacks is first pulled from a remote store."""
    store = remote_store(settings)
    if store is not None and _is_upload(dataset):
        fetch_upload(store, dataset.id, upload_folder(settings, dataset.id))
    root = real(settings.datasets_dir / dataset.path)
    if not is_inside(root, settings.datasets_dir) or not root.is_dir():
        raise DatasetError(
            f"the files of dataset {dataset.id!r} are missing",
            details=[problem(dataset.path, "dataset folder is missing", "missing_file")],
        )
    return root


def datasets_base(settings: Settings, scope: str | None) -> Path:
    """The folder dataset paths resolve in: the tenant's own folder of the datasets directory, or the
    whole directory for an admin (scope None)."""
    return settings.datasets_dir if scope is None else settings.datasets_dir / scope


def resolve_path(settings: Settings, relative: str, *, scope: str | None) -> Path:
    """A dataset folder named by its path inside the datasets directory; symlinks may not lead out.

    Raises `InvalidInput` for the spec's `path` field.
    """
    base = datasets_base(settings, scope)
    root = real(base / relative)
    if not is_inside(root, base):
        raise InvalidInput.field(["path"], "dataset path leads outside the datasets directory")
    if not root.is_dir():
        raise InvalidInput.field(
            ["path"], f"dataset directory {relative!r} does not exist in the datasets directory"
        )
    return root


def resolve_spec(
    session: Session, *, settings: Settings, spec: DatasetSpec, scope: str | None
) -> ResolvedDataset:
    """A dataset spec as a folder and options.

    Raises `InvalidInput` with the spec's field at fault (locations relative to the spec: a path
    outside the datasets directory or missing, an unknown id, a format or option that does not fit
    the registered dataset). An upload this machine lacks is pulled from the remote store after
    `session`'s connection is given back (`release_connection`): call it before writing anything.
    """
    if spec.id is None:
        assert spec.path is not None and spec.format is not None
        return ResolvedDataset(
            resolve_path(settings, spec.path, scope=scope), options_for(spec.format, spec, None), None
        )
    dataset = session.get(Dataset, spec.id)
    if dataset is None or not sees(dataset.tenant, scope):
        raise InvalidInput.field(["id"], f"dataset {spec.id!r} is not registered")
    if spec.format is not None and spec.format != dataset.format:
        raise InvalidInput.field(
            ["format"], f"dataset {spec.id!r} is a {dataset.format} dataset, not {spec.format}"
        )
    misplaced = spec.misplaced_options(dataset.format)
    if misplaced:
        raise InvalidInput.field(
            [misplaced[0]], f"{misplaced[0]} does not apply to {dataset.format} dataset {spec.id!r}"
        )
    if needs_pull(settings, dataset):
        # A download of minutes: no pooled connection held meanwhile (nothing is written before this
        # by its callers, POST /jobs and a training process).
        release_connection(session)
    try:
        root = dataset_root(settings, dataset)
    except DatasetError as exc:
        raise InvalidInput.field(["id"], exc.message) from exc
    return ResolvedDataset(root, options_for(dataset.format, spec, dataset.options), dataset.id)


def register_upload(
    session: Session,
    *,
    settings: Settings,
    archive: Path,
    principal: Principal,
    name: str | None,
    bbox_format: str | None,
) -> Dataset:
    """Extract an uploaded archive safely, detect its format, validate it and register it.

    A dataset with errors is still registered (status `invalid`, with its report) so it can be
    inspected; an archive that is refused or whose format is not recognised leaves nothing behind.
    """
    dataset_id = new_id()
    dest = upload_folder(settings, dataset_id)
    archive_bytes = archive.stat().st_size
    # Before extracting (the archive's size), and after (the files' size): within the tenant's quota.
    check_storage(session, settings=settings, principal=principal, adding=archive_bytes)
    extracted = extract_archive(archive, dest, limits(settings))
    try:
        check_storage(session, settings=settings, principal=principal, adding=extracted.bytes)
        fmt, base = detect_format(dest)
        if bbox_format is not None and fmt != "hf":
            raise InvalidInput(f"bbox_format applies to Hugging Face datasets only; this one is {fmt}")
        options = {"bbox_format": bbox_format} if bbox_format else {}
        root = base.resolve()
        report = validate_dataset(
            root,
            options_for(fmt, None, options),
            cache_root(settings, root),
            annotation_max_bytes=settings.annotation_max_bytes,
        )
        # Stored before the 201: a worker on another machine trains from the store's copy.
        store = remote_store(settings)
        if store is not None:
            push_upload(store, dataset_id, dest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        with contextlib.suppress(StorageError):  # the store may be what failed
            delete_upload(settings, dataset_id)
        raise
    now = utcnow()
    dataset = Dataset(
        id=dataset_id,
        tenant=principal.tenant,
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


def get_dataset(session: Session, *, dataset_id: str, scope: str | None) -> Dataset:
    """The dataset, or 404 (also for another tenant's)."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or not sees(dataset.tenant, scope):
        raise NotFound(f"dataset {dataset_id!r} not found")
    return dataset


def list_datasets(
    session: Session, *, limit: int, offset: int, scope: str | None
) -> tuple[Sequence[Dataset], int]:
    """Newest first."""
    mine = visible(Dataset.tenant, scope)
    rows = session.scalars(
        select(Dataset)
        .where(mine)
        .order_by(Dataset.created_at.desc(), Dataset.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return rows, session.scalar(select(func.count()).select_from(Dataset).where(mine)) or 0


def validate(
    session: Session, *, settings: Settings, dataset_id: str, bbox_format: str | None, scope: str | None
) -> Dataset:
    """Validate again (e.g. with another bbox_format, which is then stored); updates status and report."""
    dataset = get_dataset(session, dataset_id=dataset_id, scope=scope)
    if bbox_format is not None and dataset.format != "hf":
        raise InvalidInput(f"bbox_format applies to Hugging Face datasets only; this one is {dataset.format}")
    options = dict(dataset.options or {})
    if bbox_format is not None:
        options["bbox_format"] = bbox_format
    root = dataset_root(settings, dataset)
    report = validate_dataset(
        root,
        options_for(dataset.format, None, options),
        cache_root(settings, root),
        annotation_max_bytes=settings.annotation_max_bytes,
    )
    dataset.options = options
    dataset.report = report
    dataset.classes = report["classes"] or None
    dataset.status = DatasetStatus.ready if report["ok"] else DatasetStatus.invalid
    dataset.validated_at = utcnow()
    session.flush()
    return dataset


def upload_folder(settings: Settings, dataset_id: str) -> Path:
    """Where an uploaded dataset's files are."""
    return settings.datasets_dir / UPLOADS / dataset_id


def delete_dataset(
    session: Session, *, settings: Settings, dataset_id: str, users: DatasetUsers, scope: str | None
) -> Path:
    """Unregister a dataset (409 while a queued or running job uses it); returns the folder to remove
    once the caller has committed."""
    dataset = get_dataset(session, dataset_id=dataset_id, scope=scope)
    in_use = users(
        session, settings=settings, dataset_id=dataset.id, folder=upload_folder(settings, dataset.id)
    )
    if in_use:
        raise Conflict(
            f"dataset {dataset_id!r} is used by {len(in_use)} queued or running job(s): "
            f"{', '.join(in_use[:10])}; cancel them or wait for them to finish",
            details=in_use,
        )
    session.delete(dataset)
    session.flush()
    return upload_folder(settings, dataset_id)


def remove_files(folder: Path) -> None:
    """Delete an unregistered dataset's folder."""
    shutil.rmtree(folder, ignore_errors=True)
