"""A job's files over the API: what can be downloaded, where it is, and the ONNX export.

Which files a job has, and the rule that keeps every served path inside the job's own directory,
are `app.jobs.files`: a download name is looked up in its listing, never joined to a path.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from app.artifacts.schemas import Artifact, ArtifactList, ExportOut
from app.errors import NotFound
from app.inference import call_model_server
from app.jobs import files
from app.jobs.service import get_job
from app.ml.types import DEFAULT_CONF, DEFAULT_IOU
from app.prediction.service import best_checkpoint
from app.settings import Settings

EXPORT_TIMEOUT_SECONDS = 600.0


def _artifact(job_id: str, name: str, kind: str, path: Path) -> Artifact:
    return Artifact(name=name, kind=kind, size=path.stat().st_size, url=f"/jobs/{job_id}/artifacts/{name}")


def list_artifacts(session: Session, *, job_id: str) -> ArtifactList:
    """The job's downloadable files with their sizes (empty before it has run)."""
    job = get_job(session, job_id=job_id)
    items = [_artifact(job.id, name, f.kind, f.path) for name, f in files.list_files(job).items()]
    return ArtifactList(job_id=job.id, status=job.status, items=items)


def artifact_path(session: Session, *, job_id: str, name: str) -> Path:
    """The file behind a listed artifact name; 404 for anything not listed."""
    job = get_job(session, job_id=job_id)
    found = files.find_file(job, name)
    if found is None:
        raise NotFound(f"job {job_id!r} has no artifact {name!r}")
    return found.path


def export_onnx(session: Session, *, settings: Settings, job_id: str) -> ExportOut:
    """Export the job's best model to ONNX with SG (preprocessing and NMS inside) into
    `<job_dir>/export/model.onnx`; an export of the same checkpoint is reused. 409 without a
    best checkpoint."""
    job = get_job(session, job_id=job_id)
    checkpoint = best_checkpoint(job)
    assert job.job_dir is not None  # a job with a checkpoint has a directory
    output = files.export_file(Path(job.job_dir))
    result = call_model_server(
        settings,
        "export",
        timeout=EXPORT_TIMEOUT_SECONDS,
        model=job.model,
        checkpoint=str(checkpoint),
        output=str(output),
        conf=DEFAULT_CONF,
        iou=DEFAULT_IOU,
    )
    return ExportOut(
        job_id=job.id,
        artifact=_artifact(job.id, files.EXPORT_NAME, files.ONNX_KIND, output),
        cached=result["cached"],
        seconds=round(result["seconds"], 3),
        input_shape=result["input_shape"],
        input_dtype=result["input_dtype"],
        outputs=result["outputs"],
        classes=list(job.classes or []),
        conf=DEFAULT_CONF,
        iou=DEFAULT_IOU,
    )
