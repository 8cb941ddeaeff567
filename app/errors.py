"""Domain errors. Each carries its HTTP status; one handler in `app.main` maps them to responses."""

from __future__ import annotations

from typing import Any


class AppError(Exception):
    """Base class: `status_code` and a machine-readable `code`, plus a message a user can act on."""

    status_code: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class NotFound(AppError):
    status_code = 404
    code = "not_found"


class Conflict(AppError):
    status_code = 409
    code = "conflict"


class InvalidInput(AppError):
    status_code = 422
    code = "invalid_input"


class PayloadTooLarge(AppError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(AppError):
    status_code = 415
    code = "unsupported_media_type"


class ServiceUnavailable(AppError):
    status_code = 503
    code = "service_unavailable"


class DatasetError(InvalidInput):
    """The dataset cannot be used for training. `details` holds the problems, each naming its file."""

    code = "dataset_error"
