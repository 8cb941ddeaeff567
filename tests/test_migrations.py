"""The migrations build exactly the schema the models declare, on both backends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import app.auth.models
import app.datasets.models
import app.jobs.models
import app.webhooks.models
import app.weights.models
import app.workers.models  # noqa: F401  (registers the tables)
from app.db import Base
from app.migrate import pending, upgrade
from app.settings import Settings
from app.testing import backend_resources
from tests.conftest import PG_ADMIN_URL, REDIS_URL


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    with backend_resources(
        "postgres", prefix="sgjobs-mig", pg_admin_url=PG_ADMIN_URL, redis_url=REDIS_URL
    ) as b:
        assert b.database_url is not None
        yield b.database_url


def test_migrations_match_the_models(fresh_url: str) -> None:
    upgrade(fresh_url)
    engine = sa.create_engine(fresh_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
        # Job state is enforced in SQL too.
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO jobs (id, status, model, spec, max_epochs, best_metric_name, created_at,"
                    " attempt, restarts, max_restarts) VALUES ('j', 'paused', 'yolo_nas_s', '{}', 1, 'x',"
                    " '2026-01-01 00:00:00', 0, 0, 2)"
                )
            )
    finally:
        engine.dispose()


def test_api_refuses_an_unmigrated_database(fresh_url: str, tmp_path: Path) -> None:
    from tests.auth.helpers import sgjobs

    settings = Settings(home=tmp_path / "home", database_url=fresh_url)
    refused = sgjobs(settings, "api", "--port", "1")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "not migrated" in refused.stderr and "sgjobs migrate" in refused.stderr
    assert "Traceback" not in refused.stderr
    upgrade(fresh_url, "0004")
    behind = pending(fresh_url)
    assert behind is not None and "at revision 0004" in behind
    upgrade(fresh_url)
    assert pending(fresh_url) is None
