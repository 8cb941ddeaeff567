"""Schema pieces every area shares."""

from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

# The largest offset a list accepts: far past any real page, small enough for every database's
# 64-bit OFFSET (a larger number is a 422, not an integer overflow in the driver).
MAX_OFFSET = 1_000_000_000
# Object ids (jobs, datasets) are hex; ids from a client may use letters, digits, '-' and '_', so
# anything else (a NUL, a slash) is refused as invalid rather than looked up.
ID_PATTERN = r"^[A-Za-z0-9_-]+$"
ID_MAX_LENGTH = 64
# Names shown in lists and logs: no control characters (PostgreSQL refuses NUL outright).
PRINTABLE_PATTERN = r"^[^\x00-\x1f\x7f]*$"


class StrictModel(BaseModel):
    """Request bodies: an unknown field is a 422, so a typo in a spec is never silently ignored."""

    model_config = ConfigDict(extra="forbid")


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a list, newest first; `total` counts every match."""

    items: list[T]
    total: int = Field(ge=0)
    limit: int = Field(ge=1)
    offset: int = Field(ge=0)
