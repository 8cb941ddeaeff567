"""Errors and the one shape every error answer has: RFC 9457 problem details.

Domain errors are exception classes that carry their HTTP status and a machine-readable `code`;
`app.error_handlers` maps them (and FastAPI's and Starlette's own errors) to `application/problem+json`
with `type`, `title`, `status`, `detail` and `code`, plus one typed extension member where the error
has more to say: `errors` (field errors), `problems` (what is wrong with a dataset), `limits` (the
limit that was broken) or `job_ids` (the jobs in the way). Only pydantic here: the worker and the
training process raise these too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

PROBLEM_MEDIA_TYPE = "application/problem+json"
# Problem types are URNs: stable identifiers a client can switch on, with no page to host.
PROBLEM_TYPE_PREFIX = "urn:sgjobs:problem:"
# How long a client should wait before retrying a 503 (the database or the inference process).
RETRY_AFTER_SECONDS = 5


class FieldError(BaseModel):
    """One invalid field: where it is (`["body", "training", "max_epochs"]`), what is wrong, its kind."""

    loc: list[str | int]
    msg: str
    type: str


class DatasetProblem(BaseModel):
    """One problem found in a dataset, naming its file."""

    file: str
    problem: str
    severity: str = Field(description="error or warning")
    code: str | None = Field(default=None, description="A stable name for the kind of problem.")


class LimitInfo(BaseModel):
    """The limit a request broke, by its setting's name, and the limit's value."""

    limit: str
    value: float


def broken_limit(limit: str, value: float) -> list[dict[str, Any]]:
    """`details` of an error whose extension is `limits`: the broken limit (a setting's or a constant's
    name) and its value."""
    return [{"limit": limit, "value": value}]


class Problem(BaseModel):
    """RFC 9457 problem details: the body of every 4xx and 5xx answer."""

    type: str = Field(description="A URN naming the kind of problem (`about:blank` for plain HTTP errors).")
    title: str = Field(description="The status code's reason phrase.")
    status: int
    detail: str = Field(description="What went wrong and what to do about it.")
    instance: str | None = Field(default=None, description="The request path.")
    code: str = Field(description="A stable machine-readable name for the kind of problem.")
    errors: list[FieldError] | None = Field(default=None, description="Field errors (422).")
    problems: list[DatasetProblem] | None = Field(default=None, description="A dataset's problems.")
    limits: list[LimitInfo] | None = Field(default=None, description="The limit that was broken.")
    job_ids: list[str] | None = Field(default=None, description="The jobs that stand in the way (409).")


class AppError(Exception):
    """Base class: `status_code` and a machine-readable `code`, plus a message a user can act on.

    `details` fills the class's `extension` member of the problem (see `Problem`).
    """

    status_code: int = 400
    code: str = "bad_request"
    extension: str | None = None

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def headers(self) -> dict[str, str] | None:
        """Response headers the status calls for (`WWW-Authenticate`, `Retry-After`)."""
        return None


class Unauthorized(AppError):
    """401: no key, or one that is unknown or revoked."""

    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str, *, invalid_token: bool = False) -> None:
        super().__init__(message)
        self.invalid_token = invalid_token

    def headers(self) -> dict[str, str] | None:
        # RFC 6750: a request without credentials gets the scheme alone, a bad key `invalid_token`.
        error = ', error="invalid_token"' if self.invalid_token else ""
        return {"WWW-Authenticate": f'Bearer realm="sgjobs"{error}'}


class Forbidden(AppError):
    """403: the caller is known but may not do this (a member deleting published weights, a
    cross-site request from an origin that is not allowed)."""

    status_code = 403
    code = "forbidden"


class TooManyRequests(AppError):
    """429: a quota that frees up with time (running jobs finish); `details`: `[{"limit", "value"}]`."""

    status_code = 429
    code = "quota_exceeded"
    extension = "limits"

    def __init__(self, message: str, *, retry_after: int, details: Any = None) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)}


class NotFound(AppError):
    status_code = 404
    code = "not_found"


class Conflict(AppError):
    """The request is valid but the object's state does not allow it; `details`: job ids in the way."""

    status_code = 409
    code = "conflict"
    extension = "job_ids"


class InvalidInput(AppError):
    """422; `details`: field errors `[{"loc", "msg", "type"}]` when a field is at fault."""

    status_code = 422
    code = "invalid_input"
    extension = "errors"

    @classmethod
    def field(cls, loc: Sequence[str | int], msg: str, *, message: str | None = None) -> InvalidInput:
        """An error of one field, `loc` as FastAPI writes it (`["body", "dataset", "path"]`); the
        problem's `detail` is `message`, by default the field's `msg`."""
        return cls(message or msg, details=[{"loc": list(loc), "msg": msg, "type": "value_error"}])

    def under(self, *prefix: str | int) -> InvalidInput:
        """The same error with every field location moved under `prefix` (a nested object's errors
        reported at the place the nested object has in the request)."""
        details = self.details
        if isinstance(details, list):
            details = [{**d, "loc": [*prefix, *d.get("loc", [])]} for d in details]
        moved = type(self)(self.message, details=details)
        moved.__cause__ = self
        return moved


class PayloadTooLarge(AppError):
    """413; `details`: `[{"limit", "value"}]`."""

    status_code = 413
    code = "payload_too_large"
    extension = "limits"


class UnsupportedMediaType(AppError):
    status_code = 415
    code = "unsupported_media_type"


class ServiceUnavailable(AppError):
    status_code = 503
    code = "service_unavailable"

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(RETRY_AFTER_SECONDS)}


class DatasetError(InvalidInput):
    """The dataset cannot be used for training. `details` holds the problems, each naming its file."""

    code = "dataset_error"
    extension = "problems"
