"""The weights folder: checkpoint files named as super-gradients publishes them, registered as weights.

super-gradients' download URLs for its pretrained YOLO-NAS weights no longer answer, so whoever has
the files puts them in `SGJOBS_WEIGHTS_DIR` under their published names (`yolo_nas_s_coco.pth`, ...).
The API registers them at start (in the background) and, for a file put there later, when a job spec
first asks for it (`"init_from": {"pretrained": "coco"}`), as SG's `pretrained_weights="coco"` names
them. A registered file is copied into the store: the folder is an inbox, and replacing a file there
registers the new one without changing weights that jobs already started from.

These functions are a unit of work of their own (they commit, in their own session, under one lock):
a published file is registered once even when several requests ask for it at the same moment.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import get_args

from app.auth.principal import PUBLISHED_TENANT
from app.db import session_scope
from app.errors import InvalidInput
from app.ml.types import ModelName, PretrainedName
from app.settings import Settings
from app.weights import service
from app.weights.models import Weights, WeightsSource

logger = logging.getLogger(__name__)

# Datasets super-gradients published YOLO-NAS weights for (`pretrained_weights=`).
PUBLISHED_DATASETS: tuple[str, ...] = get_args(PretrainedName)

_lock = threading.Lock()
# File path -> (size, mtime_ns, sha256) when this process last hashed it: an unchanged file is not
# hashed again on every job that asks for it.
_seen: dict[str, tuple[int, int, str]] = {}


def published_name(model: str, dataset: str) -> str:
    """The file name super-gradients published `model`'s weights for `dataset` under."""
    return f"{model}_{dataset}.pth"


def published_files() -> dict[str, tuple[str, str]]:
    """Every published file name -> (model, dataset)."""
    return {
        published_name(model, dataset): (model, dataset)
        for model in get_args(ModelName)
        for dataset in PUBLISHED_DATASETS
    }


def _register(
    settings: Settings, path: Path, model: str, dataset: str, inspector: service.Inspector
) -> Weights:
    stat = path.stat()
    signature = (stat.st_size, stat.st_mtime_ns)
    seen = _seen.get(str(path))
    if seen is not None and seen[:2] == signature:
        with session_scope(settings.database_url) as session:
            weights = service.find_by_sha(session, seen[2], tenant=PUBLISHED_TENANT)
        if weights is not None:
            return weights
    staged = service.stage_copy(settings, path)
    try:
        weights, created = service.register_staged(
            settings,
            staged=staged,
            tenant=PUBLISHED_TENANT,
            name=path.name,
            inspector=inspector,
            source=WeightsSource.folder,
            expected_model=model,
            model_loc=["pretrained"],
            pretrained=dataset,
        )
    finally:
        staged.path.unlink(missing_ok=True)
    _seen[str(path)] = (*signature, weights.sha256)
    if created:
        logger.info("registered %s from the weights folder as weights %s", path.name, weights.id)
    return weights


def ensure_published(
    settings: Settings, *, model: str, dataset: str, inspector: service.Inspector
) -> Weights:
    """The weights of the published file for `model` and `dataset`, registered now if need be.

    InvalidInput (field `pretrained`) when the file is not in the weights folder (naming the file and
    the folder) or is not a usable checkpoint of `model` (with the reason).
    """
    name = published_name(model, dataset)
    path = settings.weights_dir / name
    if not path.is_file():
        raise InvalidInput.field(
            ["pretrained"],
            f"pretrained {dataset!r} weights for {model} are the file {name}, which is not in the weights "
            f"folder {settings.weights_dir}: put {name} (super-gradients' published file) there",
        )
    with _lock:
        try:
            return _register(settings, path, model, dataset, inspector)
        except InvalidInput as exc:
            raise InvalidInput.field(
                ["pretrained"], f"{name} in {settings.weights_dir}: {exc.message}"
            ) from exc


def sync_folder(settings: Settings, inspector: service.Inspector) -> list[Weights]:
    """Register every published file in the weights folder (at start); a file that cannot be
    registered is logged and skipped (a job asking for it gets the reason)."""
    registered = []
    for name, (model, dataset) in sorted(published_files().items()):
        if not (settings.weights_dir / name).is_file():
            continue
        try:
            registered.append(ensure_published(settings, model=model, dataset=dataset, inspector=inspector))
        except Exception as exc:
            logger.warning("weights folder: %s not registered: %s", name, exc)
    return registered


def has_published_files(settings: Settings) -> bool:
    """True when the weights folder holds at least one published file."""
    return any((settings.weights_dir / name).is_file() for name in published_files())
