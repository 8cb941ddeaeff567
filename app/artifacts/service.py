"""A job's files over the API: what can be downloaded, where it is, and the ONNX export; likewise the
file and ONNX export of registered weights.

Which files a job has, and the rule that keeps every served path inside the job's own directory,
are `app.jobs.files`: a download name is looked up in its listing, never joined to a path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.artifacts.schemas import Artifact, ArtifactList, ExportOut
from app.errors import NotFound
from app.inference import call_model_server
from app.jobs import files
from app.jobs.service import get_job
from app.ml.types import DEFAULT_CONF, DEFAULT_IOU
from app.prediction.service import best_checkpoint
from app.settings import Settings
from app.weights import service as weights

EXPORT_TIMEOUT_SECONDS = 600.0


def _artifact(job_id: str, name: str, kind: str, path: Path) -> Artifact:
    return Artifact(name=name, kind=kind, size=path.stat().st_size, url=f"/jobs/{job_id}/artifacts/{name}")


def list_artifacts(session: Session, *, job_id: str, scope: str | None) -> ArtifactList:
    """The job's downloadable files with their sizes (empty before it has run)."""
    job = get_job(session, job_id=job_id, scope=scope)
    items = [_artifact(job.id, name, f.kind, f.path) for name, f in files.list_files(job).items()]
    return ArtifactList(job_id=job.id, status=job.status, items=items)


def artifact_path(session: Session, *, job_id: str, name: str, scope: str | None) -> Path:
    """The file behind a listed artifact name; 404 for anything not listed."""
    job = get_job(session, job_id=job_id, scope=scope)
    found = files.find_file(job, name)
    if found is None:
        raise NotFound(f"job {job_id!r} has no artifact {name!r}")
    return found.path


def _export(
    settings: Settings, *, model: str, checkpoint: Path, output: Path, class_names: list[str] | None
) -> dict[str, Any]:
    return call_model_server(
        settings,
        "export",
        timeout=EXPORT_TIMEOUT_SECONDS,
        model=model,
        checkpoint=str(checkpoint),
        output=str(output),
        class_names=class_names,
        conf=DEFAULT_CONF,
        iou=DEFAULT_IOU,
    )


def export_onnx(session: Session, *, settings: Settings, job_id: str, scope: str | None) -> ExportOut:
    """Export the job's best model to ONNX with SG (preprocessing and NMS inside) into
    `<job_dir>/export/model.onnx`; an export of the same checkpoint is reused. 409 without a
    best checkpoint."""
    job = get_job(session, job_id=job_id, scope=scope)
    checkpoint = best_checkpoint(job)
    assert job.job_dir is not None  # a job with a checkpoint has a directory
    output = files.export_file(Path(job.job_dir))
    result = _export(settings, model=job.model, checkpoint=checkpoint, output=output, class_names=None)
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


# What registered weights serve for download, by name: their checkpoint and their ONNX export.
WEIGHTS_CHECKPOINT = "weights.pth"


def weights_artifact_path(
    session: Session, *, settings: Settings, weights_id: str, name: str, scope: str | None
) -> Path:
    """The file behind a weights artifact name (`weights.pth`, `export/model.onnx`); 404 otherwise."""
    found = weights.get_weights(session, weights_id=weights_id, scope=scope)
    paths = {
        WEIGHTS_CHECKPOINT: weights.weights_file(settings, found.id),
        files.EXPORT_NAME: weights.export_file(settings, found.id),
    }
    path = paths.get(name)
    if path is None or not path.is_file():
        raise NotFound(f"weights {weights_id!r} have no artifact {name!r} (they have {', '.join(paths)})")
    return path


def export_weights(session: Session, *, settings: Settings, weights_id: str, scope: str | None) -> ExportOut:
    """Export registered weights to ONNX with SG (preprocessing and NMS inside; a file without SG's
    preprocessing gets SG's own for pretrained YOLO-NAS, 640 px), reused while the file is current."""
    found = weights.get_weights(session, weights_id=weights_id, scope=scope)
    checkpoint = weights.existing_file(settings, found)
    output = weights.export_file(settings, found.id)
    result = _export(
        settings, model=found.model, checkpoint=checkpoint, output=output, class_names=found.classes
    )
    return ExportOut(
        weights_id=found.id,
        artifact=Artifact(
            name=files.EXPORT_NAME,
            kind=files.ONNX_KIND,
            size=output.stat().st_size,
            url=f"/weights/{found.id}/artifacts/{files.EXPORT_NAME}",
        ),
        cached=result["cached"],
        seconds=round(result["seconds"], 3),
        input_shape=result["input_shape"],
        input_dtype=result["input_dtype"],
        outputs=result["outputs"],
        classes=list(found.classes or []),
        conf=DEFAULT_CONF,
        iou=DEFAULT_IOU,
    )
