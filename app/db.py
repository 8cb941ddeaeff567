"""Engine, sessions and the declarative base (typed SQLAlchemy 2, naming convention, UTC timestamps)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    CursorResult,
    DateTime,
    Engine,
    Executable,
    Integer,
    MetaData,
    create_engine,
    event,
    literal,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY; Postgres gets a real 64-bit key.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    """A random 32-character hex id: unguessable, so ids in URLs leak nothing about other objects."""
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, also on SQLite (which stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class db_now(FunctionElement[datetime]):
    """The database's clock, optionally `seconds` ahead: `db_now()`, `db_now(lease_seconds)`.

    Leases and heartbeats are written and compared in this one clock, so hosts whose clocks
    disagree (a worker, the sweeper on another machine) cannot expire each other's leases early.
    PostgreSQL: `now()` (the transaction's start). SQLite stores UTC text, so its clock is
    `strftime` in exactly the format SQLAlchemy writes (6 fractional digits), and text order is
    time order.
    """

    type = UTCDateTime()
    inherit_cache = True

    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__(literal(float(seconds)))


@compiles(db_now, "postgresql")
def _db_now_postgresql(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    offset = compiler.process(element.clauses, **kw)
    return f"(now() + make_interval(secs => {offset}))"


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    offset = compiler.process(element.clauses, **kw)
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now', printf('%+.3f seconds', {offset}))"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while the training process writes; busy_timeout waits out short locks.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


# Statements that take row (or advisory) locks held to the end of their transaction.
_LOCKING = re.compile(
    r"^\s*(INSERT|UPDATE|DELETE)\b|\bFOR\s+(NO\s+KEY\s+)?UPDATE\b|\bFOR\s+(KEY\s+)?SHARE\b|pg_advisory_xact_lock",
    re.IGNORECASE,
)
_BOUNDED = "sgjobs_idle_bounded"


def bound_locked_idle(engine: Engine, seconds: float) -> None:
    """PostgreSQL: a transaction that takes locks may sit idle at most `seconds`, then the server
    ends its session and frees them.

    A process frozen between a write and its commit (SIGSTOP, a paused VM, a debugger, a swapped-out
    host) keeps its row locks, and every writer of those rows waits for it: the sweepers could
    not expire any lease while a paused worker held its job's row. The bound is set (`SET LOCAL`)
    by the transaction's first locking statement, so read-only transactions (a long upload's quota
    check) are not bounded; no transaction here writes and then does slow work before its commit.
    """
    milliseconds = max(1, round(seconds * 1000))

    def begin(conn: Any) -> None:
        conn.info.pop(_BOUNDED, None)

    def before_cursor_execute(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        if not conn.info.get(_BOUNDED) and _LOCKING.search(statement):
            cursor.execute(f"SET LOCAL idle_in_transaction_session_timeout = {milliseconds}")
            conn.info[_BOUNDED] = True

    event.listen(engine, "begin", begin)
    event.listen(engine, "before_cursor_execute", before_cursor_execute)


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """One engine per URL per process."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
    from app.settings import get_settings  # the settings name the database, not the reverse

    bound_locked_idle(engine, get_settings().db_lock_idle_seconds)
    return engine


@lru_cache(maxsize=8)
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


def connection_lost(exc: BaseException) -> bool:
    """The database is away, or ended this connection's session (a restart, a failover, the
    `bound_locked_idle` timeout): a retry on a new connection may succeed, not a refused statement."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def changed(session: Session, statement: Executable) -> int:
    """Rows an UPDATE or DELETE changed: how a conditional state change tells whether it won."""
    return cast(CursorResult[Any], session.execute(statement)).rowcount


def serialize_on(session: Session, key: str, *, table: str) -> None:
    """Hold off every other transaction that calls this with the same `key` until this one ends.

    For check-then-insert rules (a tenant's quota): the count and the insert happen under the lock,
    so two requests cannot both see room for one more. PostgreSQL: a transaction-scoped advisory lock
    on the key's hash. SQLite allows one writer at a time: a write that changes nothing takes the
    database's write lock now rather than at the insert (the lock is the whole database, not the key,
    which SQLite's single writer costs anyway); `table` names any table the transaction may write.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": key})
    else:
        session.execute(text(f'UPDATE "{table}" SET rowid = rowid WHERE 0'))


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A unit of work outside a request (worker, CLI): commits on success, rolls back on error."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def release_connection(session: Session) -> None:
    """Give `session`'s database connection back to the pool before a long wait (the inference
    process, a download from the store).

    A prediction, an export or a download takes seconds to minutes; holding a pooled connection
    meanwhile lets a few slow calls take every connection from the routes that need one. What the
    session loaded stays readable (detached); it starts a new transaction if used again. Nothing is
    committed: call it only where the session has nothing to write yet.
    """
    session.close()
