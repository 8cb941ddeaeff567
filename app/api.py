"""Request-scoped dependencies, declared once for every router."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from anyio import CancelScope
from fastapi import Depends, Path, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.auth import service as auth
from app.auth.cache import KeyCache
from app.auth.principal import Principal
from app.db import get_sessionmaker, session_scope
from app.errors import Unauthorized
from app.redaction import Redactor
from app.schemas import ID_MAX_LENGTH, ID_PATTERN
from app.settings import Settings, get_settings

# These dependencies are `async`: FastAPI runs a plain `def` dependency in a worker thread, a round
# trip per dependency (two for one that yields) on every request. A /predict refused after its form
# was read went from 1.5 to 0.9 ms with them async (2 cores). None does I/O on the event loop.


async def get_settings_dep() -> Settings:
    return get_settings()


async def get_session() -> AsyncIterator[Session]:
    """One session per request; endpoints commit, anything left uncommitted is rolled back.

    A session connects at its first query, so making one is no I/O. Ending it is I/O only while it
    holds a connection (a transaction is open): then the rollback and the connection's return to the
    pool run in a worker thread, shielded so that a cancelled request still gives the connection back.
    """
    session = get_sessionmaker(get_settings().database_url)()
    try:
        yield session
    finally:
        if session.in_transaction():
            with CancelScope(shield=True):
                await run_in_threadpool(_end, session)
        else:
            session.close()


def _end(session: Session) -> None:
    session.rollback()
    session.close()


# Declares the scheme in the OpenAPI document; the check itself is `get_principal`'s, so a missing
# key gets the project's 401 problem with `WWW-Authenticate`, not FastAPI's 403.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key: `sgjobs keys create --tenant NAME`, or the admin key in $SGJOBS_HOME/admin.key.",
)


async def get_principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
) -> Principal:
    """The caller, from `Authorization: Bearer <key>`; 401 without a valid, unrevoked key.

    A key checked in the last `key_cache_seconds` is taken from the app's `KeyCache` on the event
    loop; otherwise the database is asked in a worker thread.
    """
    if credentials is None or not credentials.credentials:
        raise Unauthorized("send an API key as `Authorization: Bearer <key>`")
    cache: KeyCache = request.app.state.key_cache
    key_hash = auth.hash_key(credentials.credentials)
    principal = cache.get(key_hash)
    if principal is None:
        principal = await run_in_threadpool(_authenticate, credentials.credentials)
        if principal is None:
            raise Unauthorized("the API key is unknown or revoked", invalid_token=True)
        cache.put(key_hash, principal)
    return principal


def _authenticate(key: str) -> Principal | None:
    # Its own short transaction: the key check (and its occasional last-used stamp) never mixes
    # with the request's unit of work.
    with session_scope(get_settings().database_url) as session:
        return auth.authenticate(session, key=key)


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_redactor(principal: PrincipalDep, settings: SettingsDep) -> Redactor | None:
    """None for an admin (who sees answers as written); for a member, what hides host details."""
    return None if principal.is_admin else Redactor(settings)


RedactorDep = Annotated[Redactor | None, Depends(get_redactor)]
# Ids in paths (jobs, datasets).
ObjectId = Annotated[str, Path(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)]
