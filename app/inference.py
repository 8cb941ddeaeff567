"""The API process's side of the inference process: its one handle, and calls with their failures
mapped to the API's errors.

Every area that needs torch (prediction, export, inspecting an uploaded weights file) asks the
inference process (`app.ml.model_server`) through here; nothing here imports torch.
"""

from __future__ import annotations

from typing import Any

from app.errors import Conflict, InvalidInput, ServiceUnavailable
from app.ml.model_server import ModelServer, ModelServerError, ModelServerUnavailable, get_model_server
from app.settings import Settings


def model_server(settings: Settings) -> ModelServer:
    """The API process's inference process handle (started on its first call)."""
    return get_model_server(
        home=settings.home,
        capacity=settings.predict_cache_size,
        device=settings.device,
        batch_window_ms=settings.predict_batch_window_ms,
        max_batch_images=settings.predict_max_batch_images,
        max_bytes=settings.predict_cache_max_bytes,
    )


def call_model_server(settings: Settings, op: str, *, timeout: float, **payload: Any) -> dict[str, Any]:
    """One request to the inference process, its failures mapped to the API's errors: 503 when it is
    down or cannot use its device or export, 409 when a checkpoint the service found cannot be loaded,
    422 when a file someone sent is not a usable checkpoint (or anything else a request got wrong)."""
    try:
        return model_server(settings).call(op, timeout=timeout, **payload)
    except ModelServerUnavailable as exc:
        raise ServiceUnavailable(str(exc)) from exc
    except ModelServerError as exc:
        if exc.kind == "load":
            raise Conflict(f"the checkpoint cannot be loaded: {exc.message}") from exc
        if exc.kind in ("export", "device"):
            raise ServiceUnavailable(exc.message) from exc
        if exc.kind == "invalid":
            raise InvalidInput(exc.message) from exc
        raise InvalidInput(f"inference failed: {exc.message}") from exc
