"""metric and event ids are never reused on SQLite (AUTOINCREMENT)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 09:30:00

Their ids are cursors (GET /jobs/{id}/metrics?cursor=, the ids of GET /jobs/{id}/stream). Without
AUTOINCREMENT, SQLite gives a new row the largest id + 1, so after `supersede_from_epoch` deletes a
job's newest points, the resumed attempt's first points got the deleted ids again, and a client
holding a cursor past them never saw them. PostgreSQL's sequences never reuse ids: nothing to do.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("metrics", "job_events")


def _recreate(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        # A copy of the table (rows, indexes, the foreign key) with the keyword; SQLite's
        # sqlite_sequence starts at the largest id copied.
        with op.batch_alter_table(
            table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
        ):
            pass


def upgrade() -> None:
    _recreate(True)


def downgrade() -> None:
    _recreate(False)
