"""The weights registry: register a checkpoint file (an upload, a job's best, a published file), read,
list and delete registered weights. Functions take a session and keyword arguments and never commit.

A registered file lives at `<weights_dir>/store/<id>.pth` and never changes. What a file is (a YOLO-NAS
checkpoint? which one? which classes?) is decided by the inference process (`Inspector`), which is the
only process that unpickles it; this module only moves, hashes and records files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.auth.principal import PUBLISHED_TENANT, Principal, sees, visible
from app.db import new_id, session_scope, utcnow
from app.errors import Conflict, Forbidden, InvalidInput, NotFound
from app.inference import call_model_server
from app.ml.types import CheckpointInfo
from app.quotas import check_storage
from app.settings import Settings
from app.storage import StorageError
from app.weights import stored
from app.weights.models import Weights, WeightsSource

STORE = "store"
INCOMING = ".incoming"
EXPORTS = "exports"
CHUNK = 1024 * 1024
# Loading and checking a large checkpoint (YOLO-NAS-L with its optimizer state) on a slow disk.
INSPECT_TIMEOUT_SECONDS = 300.0


class Inspector(Protocol):
    """What a weights file is; raises InvalidInput (422) with the reason when it is not a usable
    YOLO-NAS checkpoint. The service's own is the inference process (`model_server_inspector`)."""

    def __call__(self, path: Path) -> CheckpointInfo: ...


def model_server_inspector(settings: Settings) -> Inspector:
    """Inspection by the inference process (op `inspect`): the file is unpickled there, never here."""

    def inspect(path: Path) -> CheckpointInfo:
        result = call_model_server(settings, "inspect", timeout=INSPECT_TIMEOUT_SECONDS, path=str(path))
        return CheckpointInfo(**result)

    return inspect


class WeightsUsers(Protocol):
    """The ids of queued or running jobs that start from these weights. The jobs area implements it
    and `app.main` wires it in: weights never imports jobs."""

    def __call__(self, session: Session, *, weights_id: str) -> list[str]: ...


@dataclass(frozen=True)
class JobCheckpoint:
    """A finished job's best checkpoint, to promote to weights."""

    job_id: str
    job_name: str | None
    path: Path


class JobCheckpoints(Protocol):
    """A finished job's best checkpoint: InvalidInput (field `from_job`) for an unknown job, Conflict
    while it runs or when it has none. The jobs area implements it, `app.main` wires it in."""

    def __call__(
        self, session: Session, *, settings: Settings, job_id: str, scope: str | None
    ) -> JobCheckpoint: ...


@dataclass(frozen=True)
class Staged:
    """A file copied or uploaded into the staging folder, with its size and SHA-256."""

    path: Path
    size: int
    sha256: str


def staging_dir(settings: Settings) -> Path:
    """Uploads and copies are written here first: the same filesystem as the store, so registering is
    a rename."""
    path = settings.weights_dir / INCOMING
    path.mkdir(parents=True, exist_ok=True)
    return path


def staging_file(settings: Settings) -> Path:
    """A fresh name in the staging folder."""
    return staging_dir(settings) / f"{uuid.uuid4().hex}.upload"


def weights_file(settings: Settings, weights_id: str) -> Path:
    """Where registered weights' file is."""
    return settings.weights_dir / STORE / f"{weights_id}.pth"


def export_file(settings: Settings, weights_id: str) -> Path:
    """Where the ONNX export of registered weights is written."""
    return settings.weights_dir / EXPORTS / weights_id / "model.onnx"


def stage_copy(settings: Settings, source: Path) -> Staged:
    """Copy `source` into the staging folder, hashing it on the way (one read)."""
    target = staging_file(settings)
    digest = hashlib.sha256()
    size = 0
    try:
        with open(source, "rb") as src, open(target, "wb") as out:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return Staged(target, size, digest.hexdigest())


def find_by_sha(session: Session, sha256: str, *, tenant: str) -> Weights | None:
    """The tenant's weights registered for the file with this SHA-256, if any."""
    return session.scalars(select(Weights).where(Weights.tenant == tenant, Weights.sha256 == sha256)).first()


def class_names(info: CheckpointInfo) -> list[str]:
    """The names to show and predict with: the file's, else `class_0`, `class_1`, ..."""
    return list(info.class_names) if info.class_names else [f"class_{i}" for i in range(info.num_classes)]


def _model_mismatch(found: str, expected: str, loc: Sequence[str]) -> InvalidInput:
    return InvalidInput.field(loc, f"the file is a {found} checkpoint, not the {expected} the request names")


def register_file(
    session: Session,
    *,
    settings: Settings,
    staged: Staged,
    tenant: str,
    name: str,
    inspector: Inspector,
    source: WeightsSource,
    expected_model: str | None = None,
    model_loc: Sequence[str] = ("body", "model"),
    job_id: str | None = None,
    pretrained: str | None = None,
    charge: Principal | None = None,
) -> tuple[Weights, bool]:
    """Register a staged file; returns the weights and whether they are new.

    The same file (by SHA-256) registered before by the tenant is those weights (nothing is inspected
    or stored again, and no quota is charged). Otherwise a new file must fit `charge`'s storage quota
    (413; None: not charged), and the inference process inspects it: 422 with the reason when it is
    not a usable YOLO-NAS checkpoint, or when it is another architecture than `expected_model`. The
    file of new weights is pushed to a remote store, then their row is flushed and the file moved
    into the local store. The caller removes the staged file (a no-op once moved) and commits; a
    concurrent registration of the same file makes the flush raise IntegrityError (its pushed copy
    is deleted), and `find_by_sha` then finds the winner.
    """
    existing = find_by_sha(session, staged.sha256, tenant=tenant)
    if existing is not None:
        if expected_model is not None and existing.model != expected_model:
            raise _model_mismatch(existing.model, expected_model, model_loc)
        return existing, False
    if charge is not None:
        check_storage(session, settings=settings, principal=charge, adding=staged.size)
    info = inspector(staged.path)
    if expected_model is not None and info.model != expected_model:
        raise _model_mismatch(info.model, expected_model, model_loc)
    weights = Weights(
        id=new_id(),
        tenant=tenant,
        name=name,
        model=info.model,
        num_classes=info.num_classes,
        classes=class_names(info),
        size_bytes=staged.size,
        sha256=staged.sha256,
        source=source,
        job_id=job_id,
        pretrained=pretrained,
        created_at=utcnow(),
    )
    # Stored before the row is written: a store failure (503) registers nothing, and the transaction
    # does not hold its locks through an upload that may take minutes (`db_lock_idle_seconds`).
    stored.push_weights(settings, weights.id, staged.path)
    try:
        session.add(weights)
        session.flush()
    except BaseException:
        with contextlib.suppress(StorageError):  # what the sweep of orphans would remove later
            stored.delete_stored(settings, weights.id)
        raise
    target = weights_file(settings, weights.id)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged.path, target)
    return weights, True


def register_staged(
    settings: Settings, *, staged: Staged, tenant: str, **register: Any
) -> tuple[Weights, bool]:
    """`register_file` in a session of its own, committed: the unit of work of an upload, a promotion
    or a published file. When a concurrent registration of the same file won (IntegrityError at the
    flush, before anything was moved), answer the winner's weights."""
    try:
        with session_scope(settings.database_url) as session:
            return register_file(session, settings=settings, staged=staged, tenant=tenant, **register)
    except IntegrityError:
        with session_scope(settings.database_url) as session:
            existing = find_by_sha(session, staged.sha256, tenant=tenant)
        if existing is None:
            raise
        return existing, False


# Whose weights every tenant sees besides its own: the operator's published ones.
SHARED_TENANTS = (PUBLISHED_TENANT,)


def get_weights(session: Session, *, weights_id: str, scope: str | None) -> Weights:
    """The weights, or 404 (also for another tenant's; published weights are everyone's)."""
    weights = session.get(Weights, weights_id)
    if weights is None or not sees(weights.tenant, scope, *SHARED_TENANTS):
        raise NotFound(f"weights {weights_id!r} not found")
    return weights


def existing_file(settings: Settings, weights: Weights) -> Path:
    """The weights' file on this machine (fetched from a remote store when only there); 409 when it
    is gone from the store."""
    path = local_file(settings, weights.id)
    if path is None:
        raise Conflict(f"the file of weights {weights.id!r} is missing from the weights store")
    return path


def local_file(settings: Settings, weights_id: str) -> Path | None:
    """The weights' file on this machine: where registration put it, else a remote store's copy
    through the cache; None when it is nowhere."""
    return stored.local_weights(settings, weights_id, weights_file(settings, weights_id))


def has_file(settings: Settings, weights_id: str) -> bool:
    """Whether the weights' file exists here or in the store, without fetching it."""
    return stored.weights_stored(settings, weights_id, weights_file(settings, weights_id))


def list_weights(
    session: Session, *, limit: int, offset: int, scope: str | None
) -> tuple[Sequence[Weights], int]:
    """Newest first: the tenant's own and the published ones."""
    mine = visible(Weights.tenant, scope, *SHARED_TENANTS)
    rows = session.scalars(
        select(Weights)
        .where(mine)
        .order_by(Weights.created_at.desc(), Weights.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return rows, session.scalar(select(func.count()).select_from(Weights).where(mine)) or 0


def delete_weights(
    session: Session, *, settings: Settings, weights_id: str, users: WeightsUsers, scope: str | None
) -> list[Path]:
    """Unregister weights (409, naming the jobs, while a queued or running job starts from them;
    403 for a member and published weights); returns the files to remove once the caller has
    committed."""
    weights = get_weights(session, weights_id=weights_id, scope=scope)
    if scope is not None and weights.tenant != scope:
        raise Forbidden(
            f"weights {weights_id!r} are published by the operator; only an admin may delete them"
        )
    in_use = users(session, weights_id=weights.id)
    if in_use:
        raise Conflict(
            f"weights {weights_id!r} are used by {len(in_use)} queued or running job(s): "
            f"{', '.join(in_use[:10])}; cancel them or wait for them to finish",
            details=in_use,
        )
    session.delete(weights)
    session.flush()
    return [weights_file(settings, weights_id), export_file(settings, weights_id).parent]


def remove_files(paths: Sequence[Path]) -> None:
    """Delete unregistered weights' file and exports."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
