"""A job's files over the API: what can be downloaded, where it is, and the ONNX export; likewise the
file and ONNX export of registered weights.

Which files a job has, and the rule that keeps every served path inside the job's own directory,
are `app.jobs.files`: a download name is looked up in its listing, never joined to a path.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.artifacts.schemas import Artifact, ArtifactList, ExportOptions, ExportOut
from app.db import release_connection
from app.errors import InvalidInput, NotFound, ServiceUnavailable
from app.inference import call_model_server
from app.jobs import files, stored
from app.jobs.models import Job
from app.jobs.service import get_job
from app.ml.types import ExportTooLarge, check_export_pixels
from app.prediction.service import best_checkpoint
from app.settings import Settings
from app.storage import ObjectMissing, Store, open_cache, open_store
from app.weights import service as weights
from app.weights.stored import weights_key

EXPORT_TIMEOUT_SECONDS = 600.0


def _artifact(
    job_id: str, name: str, kind: str, path: Path | None = None, size: int | None = None
) -> Artifact:
    if size is None:
        assert path is not None
        size = path.stat().st_size
    return Artifact(name=name, kind=kind, size=size, url=f"/jobs/{job_id}/artifacts/{name}")


def list_artifacts(session: Session, *, settings: Settings, job_id: str, scope: str | None) -> ArtifactList:
    """The job's downloadable files with their sizes (empty before it has run): from its directory
    with the local store, from the store (`stored.list_stored_files`) with a remote one."""
    job = get_job(session, job_id=job_id, scope=scope)
    store = open_store(settings)
    if store.is_local:
        items = [_artifact(job.id, name, f.kind, f.path) for name, f in files.list_files(job).items()]
    else:
        release_connection(session)  # listing the store may take a while: no pooled connection held
        listed = stored.list_stored_files(store, job).items()
        items = [_artifact(job.id, name, f.kind, size=f.size) for name, f in listed]
    return ArtifactList(job_id=job.id, status=job.status, items=items)


def artifact_path(session: Session, *, job_id: str, name: str, scope: str | None) -> Path:
    """The file behind a listed artifact name (local store); 404 for anything not listed."""
    job = get_job(session, job_id=job_id, scope=scope)
    found = files.find_file(job, name)
    if found is None:
        raise NotFound(f"job {job_id!r} has no artifact {name!r}")
    return found.path


def stored_artifact(
    session: Session, *, store: Store, job_id: str, name: str, scope: str | None
) -> stored.StoredFile:
    """The object behind a listed artifact name (remote store); 404 for anything not listed."""
    job = get_job(session, job_id=job_id, scope=scope)
    release_connection(session)
    found = stored.list_stored_files(store, job).get(name)
    if found is None:
        raise NotFound(f"job {job_id!r} has no artifact {name!r}")
    return found


def export_variant(options: ExportOptions) -> str:
    """The name part that tells an export's options apart ("" for the defaults: `export/model.onnx`
    as before options existed). Only digits, letters, "." and "-": safe in a file name."""
    if options == ExportOptions():
        return ""
    parts = []
    if options.input_size is not None:
        parts.append(f"{options.input_size[0]}x{options.input_size[1]}")
    parts += [f"b{options.batch_size}", f"conf{options.conf:g}", f"iou{options.iou:g}"]
    if options.fp16:
        parts.append("fp16")
    return "-".join(parts)


def _check_fp16(settings: Settings, options: ExportOptions) -> None:
    """422 for an fp16 export on a server whose inference process runs on the CPU (SG converts the
    model to half precision and traces it on the export device)."""
    if not options.fp16:
        return
    device = settings.device
    if device == "auto":  # the inference process decided: ask it
        device = str(
            call_model_server(settings, "stats", timeout=EXPORT_TIMEOUT_SECONDS).get("device", "cpu")
        )
    if not device.startswith("cuda"):
        raise InvalidInput.field(
            ["body", "fp16"], "an fp16 export needs a CUDA GPU; this server runs on the CPU"
        )


def _export(
    settings: Settings,
    *,
    model: str,
    checkpoint: Path,
    output: Path,
    class_names: list[str] | None,
    options: ExportOptions,
) -> dict[str, Any]:
    if options.input_size is not None:  # the checkpoint's own size is checked by the inference process
        try:
            height, width = options.input_size
            check_export_pixels(options.batch_size, height, width, settings.export_max_pixels)
        except ExportTooLarge as exc:
            raise InvalidInput.field(["body", "batch_size"], str(exc)) from exc
    _check_fp16(settings, options)
    payload: dict[str, Any] = {}
    if options != ExportOptions():  # the defaults: the request as before options existed
        payload = {"input_size": options.input_size, "batch_size": options.batch_size, "fp16": options.fp16}
    result = call_model_server(
        settings,
        "export",
        timeout=EXPORT_TIMEOUT_SECONDS,
        model=model,
        checkpoint=str(checkpoint),
        output=str(output),
        class_names=class_names,
        conf=options.conf,
        iou=options.iou,
        max_pixels=settings.export_max_pixels,
        **payload,
    )
    shape = result["input_shape"]
    wanted_size = list(options.input_size) if options.input_size is not None else shape[2:]
    if shape[0] != options.batch_size or shape[2:] != wanted_size:
        # An inference process that does not pass the options on to the export wrote a default
        # model under this options' name: remove it rather than serve it as what was asked.
        output.unlink(missing_ok=True)
        raise ServiceUnavailable(
            f"the export came out as {shape}, not as asked; the inference process ignored the options"
        )
    return result


def _export_out(result: dict[str, Any], options: ExportOptions, classes: list[str]) -> dict[str, Any]:
    return {
        "cached": result["cached"],
        "seconds": round(result["seconds"], 3),
        "input_shape": result["input_shape"],
        "input_dtype": result["input_dtype"],
        "outputs": result["outputs"],
        "classes": classes,
        "conf": options.conf,
        "iou": options.iou,
    }


def export_onnx(
    session: Session,
    *,
    settings: Settings,
    job_id: str,
    scope: str | None,
    options: ExportOptions | None = None,
) -> ExportOut:
    """Export the job's best model to ONNX with SG (preprocessing and NMS inside) into
    `<job_dir>/export/model.onnx` (`export/model-<options>.onnx` with options other than the
    defaults); an export of the same checkpoint with the same options is reused. 409 without a
    best checkpoint.

    With a remote store the best checkpoint is the store's (downloaded into the store cache), the
    export is written at its key's place in the cache and uploaded under the job's key; a stored
    export at least as new as the stored checkpoint is reused (the local rule: the export is newer
    than the checkpoint)."""
    options = options or ExportOptions()
    job = get_job(session, job_id=job_id, scope=scope)
    variant = export_variant(options)
    store = open_store(settings)
    if store.is_local:
        checkpoint = best_checkpoint(settings, job)
        assert job.job_dir is not None  # a job with a checkpoint has a directory
        output = files.export_file(Path(job.job_dir), variant)
        release_connection(session)  # the export takes seconds: no pooled connection held meanwhile
    else:
        release_connection(session)
        checkpoint, output = _remote_export_inputs(settings, store, job, variant)
    result = _export(
        settings, model=job.model, checkpoint=checkpoint, output=output, class_names=None, options=options
    )
    if not store.is_local and not result["cached"]:
        store.put_file(files.job_key(job.id, files.export_name(variant)), output)
    return ExportOut(
        job_id=job.id,
        artifact=_artifact(job.id, files.export_name(variant), files.ONNX_KIND, output),
        **_export_out(result, options, list(job.classes or [])),
    )


def _remote_export_inputs(settings: Settings, store: Store, job: Job, variant: str) -> tuple[Path, Path]:
    """The cached best checkpoint of a job in a remote store (409 without one) and where its export
    goes: the export's key's place in the store cache. A stored export at least as new as the
    stored checkpoint is fetched there after the checkpoint, so the inference process finds it
    newer than the checkpoint's copy and reuses it."""
    checkpoint = best_checkpoint(settings, job)
    cache = open_cache(settings, store)
    key = files.job_key(job.id, files.export_name(variant))
    output = cache.root / key
    best = stored.stored_checkpoint(store, job, files.CKPT_BEST)
    existing = store.stat(key)
    if best is not None and existing is not None and existing.mtime >= best.mtime:
        output = cache.local_file(key)
    return checkpoint, output


# What registered weights serve for download, by name: their checkpoint and their ONNX export.
WEIGHTS_CHECKPOINT = "weights.pth"


def weights_artifact_path(
    session: Session, *, settings: Settings, weights_id: str, name: str, scope: str | None
) -> Path:
    """The file behind a weights artifact name (`weights.pth`, `export/model.onnx`, or an export with
    options, `export/model-<options>.onnx`); 404 otherwise."""
    found = weights.get_weights(session, weights_id=weights_id, scope=scope)
    path: Path | None = None
    if name == WEIGHTS_CHECKPOINT:
        path = weights.local_file(settings, found.id)
    elif (match := _WEIGHTS_EXPORT.fullmatch(name)) is not None:
        store = open_store(settings)
        if store.is_local:
            path = _weights_export_file(settings, found.id, match["variant"] or "")
        else:
            try:
                path = open_cache(settings, store).local_file(weights_key(found.id, name))
            except ObjectMissing:
                path = None
    if path is None or not path.is_file():
        raise NotFound(
            f"weights {weights_id!r} have no artifact {name!r} "
            f"(they have {WEIGHTS_CHECKPOINT}, {files.EXPORT_NAME})"
        )
    return path


# `export/model.onnx` or `export/model-<variant>.onnx`, the variant as `export_variant` writes it:
# never a "/" or "..", so the name cannot leave the weights' export folder.
_WEIGHTS_EXPORT = re.compile(r"export/model(?:-(?P<variant>[0-9a-z]+(?:[.-][0-9a-z]+)*))?\.onnx")


def _weights_export_file(settings: Settings, weights_id: str, variant: str) -> Path:
    default = weights.export_file(settings, weights_id)
    return default.parent / Path(files.export_name(variant)).name


def export_weights(
    session: Session,
    *,
    settings: Settings,
    weights_id: str,
    scope: str | None,
    options: ExportOptions | None = None,
) -> ExportOut:
    """Export registered weights to ONNX with SG (preprocessing and NMS inside; a file without SG's
    preprocessing gets SG's own for pretrained YOLO-NAS, 640 px), reused while the file is current;
    options as for a job's export."""
    options = options or ExportOptions()
    found = weights.get_weights(session, weights_id=weights_id, scope=scope)
    release_connection(session)  # the export takes seconds: no pooled connection held meanwhile
    checkpoint = weights.existing_file(settings, found)
    variant = export_variant(options)
    name = files.export_name(variant)
    store = open_store(settings)
    if store.is_local:
        output = _weights_export_file(settings, found.id, variant)
    else:
        output = _remote_weights_export(settings, store, found.id, name)
    result = _export(
        settings,
        model=found.model,
        checkpoint=checkpoint,
        output=output,
        class_names=found.classes,
        options=options,
    )
    if not store.is_local and not result["cached"]:
        store.put_file(weights_key(found.id, name), output)
    return ExportOut(
        weights_id=found.id,
        artifact=Artifact(
            name=name,
            kind=files.ONNX_KIND,
            size=output.stat().st_size,
            url=f"/weights/{found.id}/artifacts/{name}",
        ),
        **_export_out(result, options, list(found.classes or [])),
    )


def _remote_weights_export(settings: Settings, store: Store, weights_id: str, name: str) -> Path:
    """Where an export of registered weights goes with a remote store: its key's place in the store
    cache, where a stored one (made by any machine) is fetched first. Registered weights never
    change, so a stored export of them is current; fetched after their checkpoint, it is the newer
    file, which the inference process reuses."""
    cache = open_cache(settings, store)
    key = weights_key(weights_id, name)
    try:
        return cache.local_file(key)
    except ObjectMissing:
        return cache.root / key
