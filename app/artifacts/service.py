"""A job's files: what can be downloaded, where it is, and the ONNX export.

Only files inside the job's own directory are ever served, and only those this module lists
(checkpoints, averaged model, TensorBoard event files, console log, ONNX export): a download name
is looked up in that list, and the resolved path must still be inside the job directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from app.artifacts.schemas import Artifact, ArtifactList, ExportOut
from app.errors import NotFound
from app.jobs.models import Job
from app.jobs.service import get_job
from app.prediction.service import DEFAULT_CONF, DEFAULT_IOU, best_checkpoint, call_model_server
from app.settings import Settings

EXPORT_NAME = "export/model.onnx"
EXPORT_TIMEOUT_SECONDS = 600.0
CHECKPOINT_KINDS = {
    "ckpt_best": "ckpt_best.pth",
    "ckpt_latest": "ckpt_latest.pth",
    "average_model": "average_model.pth",
}
CONSOLE_LOG = "console.log"


@dataclass(frozen=True)
class _File:
    kind: str
    path: Path


def _job_dir(job: Job) -> Path | None:
    return Path(job.job_dir).resolve() if job.job_dir else None


def _inside(path: Path, root: Path) -> bool:
    resolved = path.resolve()
    return root in resolved.parents


def _newest(paths: list[Path]) -> Path | None:
    files = [p for p in paths if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def _collect(job: Job) -> dict[str, _File]:
    """Downloadable files by name (their path relative to the job directory)."""
    root = _job_dir(job)
    if root is None or not root.is_dir():
        return {}
    recorded = job.artifacts or {}
    found: dict[str, Path] = {}
    # Recorded when the job finished; while it runs, look for the same files.
    for kind, filename in CHECKPOINT_KINDS.items():
        path = (
            Path(recorded[kind])
            if kind in recorded
            else _newest(list((root / "checkpoints").rglob(filename)))
        )
        if path is not None:
            found[kind] = path
    found["console_log"] = Path(recorded.get("console_log", root / CONSOLE_LOG))
    files = {kind: _File(kind, path) for kind, path in found.items()}
    tensorboard = (
        Path(recorded["tensorboard_dir"]).glob("events.out.tfevents.*")
        if "tensorboard_dir" in recorded
        else (root / "checkpoints").rglob("events.out.tfevents.*")
    )
    items = list(files.values()) + [_File("tensorboard", p) for p in sorted(tensorboard)]
    items.append(_File("onnx", root / EXPORT_NAME))
    return {
        path.resolve().relative_to(root).as_posix(): _File(kind, path.resolve())
        for kind, path in ((f.kind, f.path) for f in items)
        if path.is_file() and _inside(path, root)
    }


def _artifact(job_id: str, name: str, file: _File) -> Artifact:
    return Artifact(
        name=name, kind=file.kind, size=file.path.stat().st_size, url=f"/jobs/{job_id}/artifacts/{name}"
    )


def list_artifacts(session: Session, *, job_id: str) -> ArtifactList:
    """The job's downloadable files with their sizes (empty before it has run)."""
    job = get_job(session, job_id=job_id)
    items = [_artifact(job.id, name, file) for name, file in _collect(job).items()]
    return ArtifactList(job_id=job.id, status=job.status, items=items)


def artifact_path(session: Session, *, job_id: str, name: str) -> Path:
    """The file behind a listed artifact name; 404 for anything not listed."""
    job = get_job(session, job_id=job_id)
    file = _collect(job).get(name)
    root = _job_dir(job)
    if file is None or root is None or not _inside(file.path, root):
        raise NotFound(f"job {job_id!r} has no artifact {name!r}")
    return file.path


def export_onnx(session: Session, *, settings: Settings, job_id: str) -> ExportOut:
    """Export the job's best model to ONNX with SG (preprocessing and NMS inside) into
    `<job_dir>/export/model.onnx`; an export of the same checkpoint is reused. 409 without a
    best checkpoint."""
    job = get_job(session, job_id=job_id)
    checkpoint = best_checkpoint(job, settings=settings)
    root = _job_dir(job)
    assert root is not None  # a job with a checkpoint has a directory
    result = call_model_server(
        settings,
        "export",
        timeout=EXPORT_TIMEOUT_SECONDS,
        model=job.model,
        checkpoint=str(checkpoint),
        output=str(root / EXPORT_NAME),
        conf=DEFAULT_CONF,
        iou=DEFAULT_IOU,
    )
    return ExportOut(
        job_id=job.id,
        artifact=_artifact(job.id, EXPORT_NAME, _File("onnx", root / EXPORT_NAME)),
        cached=result["cached"],
        seconds=round(result["seconds"], 3),
        input_shape=result["input_shape"],
        input_dtype=result["input_dtype"],
        outputs=result["outputs"],
        classes=list(job.classes or []),
        conf=DEFAULT_CONF,
        iou=DEFAULT_IOU,
    )
