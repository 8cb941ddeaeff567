"""Request-scoped dependencies, declared once for every router."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path
from sqlalchemy.orm import Session

from app.db import get_sessionmaker
from app.schemas import ID_MAX_LENGTH, ID_PATTERN
from app.settings import Settings, get_settings


def get_settings_dep() -> Settings:
    return get_settings()


def get_session() -> Iterator[Session]:
    """One session per request; endpoints commit, anything left uncommitted is rolled back."""
    session = get_sessionmaker(get_settings().database_url)()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
# Ids in paths (jobs, datasets).
ObjectId = Annotated[str, Path(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)]
