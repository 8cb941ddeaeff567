"""Folders of a remote store that no row owns any more, and their removal (the worker's sweeper).

A delete commits its rows first and removes the objects after, so rows never point to nothing; a
store that fails at that moment leaves the objects behind, and so does an upload that crashed
between pushing its objects and committing its row. A top-level folder of the store (`jobs/<id>`,
`datasets/<id>`, `weights/<id>`) is an orphan when no row has that id and nothing under it was
written for `ORPHAN_GRACE_SECONDS`: uploads push their objects before the row commits, and a large
dataset takes minutes to push.

Only a remote store is swept. The local store is the home folder, whose `datasets/` also holds the
folders people put there themselves: those have no row and must never be deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.datasets.models import Dataset
from app.datasets.stored import DATASETS_PREFIX
from app.db import session_scope, utcnow
from app.jobs.files import JOBS_PREFIX
from app.jobs.models import Job
from app.settings import Settings
from app.storage import StorageError, Store, remote_store
from app.weights.models import Weights
from app.weights.stored import WEIGHTS_PREFIX

logger = logging.getLogger(__name__)

# Longer than any upload takes between its first pushed object and its commit.
ORPHAN_GRACE_SECONDS = 6 * 3600.0
# Ids per `IN (...)` query (SQLite allows 32766 bound parameters; PostgreSQL many more).
IDS_PER_QUERY = 500

# Each store folder and the table whose ids own its subfolders.
OWNERS: tuple[tuple[str, type[Job] | type[Dataset] | type[Weights]], ...] = (
    (JOBS_PREFIX, Job),
    (DATASETS_PREFIX, Dataset),
    (WEIGHTS_PREFIX, Weights),
)


def find_orphans(session: Session, *, store: Store, now: datetime, grace: timedelta) -> list[str]:
    """The folders (`jobs/<id>`, ...) of `store` whose id has no row and whose newest object is
    older than `grace` at `now`, sorted."""
    orphans: list[str] = []
    for prefix, model in OWNERS:
        newest: dict[str, datetime] = {}
        for info in store.list(prefix):
            owner, _, rest = info.key[len(prefix) + 1 :].partition("/")
            if not rest:
                continue  # an object beside the folders is not one of ours to judge
            newest[owner] = max(newest.get(owner, info.mtime), info.mtime)
        owned = _existing_ids(session, model, sorted(newest))
        orphans += [
            f"{prefix}/{owner}"
            for owner, mtime in sorted(newest.items())
            if owner not in owned and now - mtime >= grace
        ]
    return sorted(orphans)


def _existing_ids(
    session: Session, model: type[Job] | type[Dataset] | type[Weights], ids: Sequence[str]
) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(ids), IDS_PER_QUERY):
        chunk = ids[start : start + IDS_PER_QUERY]
        found.update(session.scalars(select(model.id).where(model.id.in_(chunk))))
    return found


def remove_orphans(settings: Settings, *, grace_seconds: float = ORPHAN_GRACE_SECONDS) -> list[str]:
    """Delete the orphaned folders of the remote store (nothing for the local one); returns them.
    A folder that cannot be deleted now is logged and tried again at the next pass."""
    store = remote_store(settings)
    if store is None:
        return []
    with session_scope(settings.database_url) as session:
        orphans = find_orphans(session, store=store, now=utcnow(), grace=timedelta(seconds=grace_seconds))
    removed: list[str] = []
    for folder in orphans:
        try:
            count = store.delete_prefix(folder)
        except StorageError as exc:  # one folder's failure must not stop the others
            logger.warning("could not remove the orphaned folder %s of %s: %s", folder, store.url, exc)
            continue
        logger.info("removed the orphaned folder %s of %s (%d objects)", folder, store.url, count)
        removed.append(folder)
    return removed
