"""Checkpoints a recent /predict found, so that the next request for the same model skips the database.

A warm `/predict` spent about 1 ms of its time outside inference reading the job's row and finding
its best checkpoint (2 cores, SQLite), the same answer every time: a succeeded job is final (it
cannot be resumed; training it further makes a new job) and registered weights never change. So
what `app.prediction.service.predictor` found for a succeeded job or for weights is reused for
`Settings.predict_lookup_seconds`, with the owner's tenant: every caller is still checked against it.

Deleting the job or the weights removes their files, and an entry whose file is gone is not used:
on the machine that deleted them, and on every machine sharing a local store, the next request
asks the database (and gets its 404). Only an API process on another machine with a remote store
(whose cached copy stays) may still predict with a deleted model, for at most that long, as a
revoked key works for `key_cache_seconds`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from app.auth.principal import sees
from app.ttl_cache import TtlCache

if TYPE_CHECKING:
    from app.prediction.service import Predictor

Kind = Literal["job", "weights"]


@dataclass(frozen=True)
class Found:
    """What was found, and whose it is: the owner's tenant, and the tenants whose objects every
    caller sees (published weights)."""

    predictor: Predictor
    tenant: str
    shared: tuple[str, ...] = ()


class LookupCache:
    """Predictors of succeeded jobs and registered weights by (kind, id), for `ttl_seconds` each."""

    def __init__(self, ttl_seconds: float) -> None:
        self._found: TtlCache[tuple[Kind, str], Found] = TtlCache(ttl_seconds)

    def get(self, kind: Kind, object_id: str, *, scope: str | None) -> Predictor | None:
        """The predictor found for the object a moment ago, if a caller of `scope` may use it and its
        checkpoint is still there; None: ask the database (which also answers the 404s)."""
        found = self._found.get((kind, object_id))
        if found is None:
            return None
        if not found.predictor.checkpoint.is_file():  # deleted: the database says so from now on
            self._found.discard((kind, object_id))
            return None
        return found.predictor if sees(found.tenant, scope, *found.shared) else None

    def put(self, kind: Kind, object_id: str, found: Found) -> None:
        self._found.put((kind, object_id), found)
