"""leases, attempts and restarts; workers; a CHECK on job status

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 04:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.jobs.models import STATUS_CHECK

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempt", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("restarts", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("max_restarts", sa.Integer(), server_default="2", nullable=False))
        batch_op.create_check_constraint("status", STATUS_CHECK)

    op.create_table(
        "workers",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_workers")),
    )
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_workers_seen_at"), ["seen_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_workers_seen_at"))
    op.drop_table("workers")

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint("status", type_="check")
        batch_op.drop_column("max_restarts")
        batch_op.drop_column("restarts")
        batch_op.drop_column("lease_expires_at")
        batch_op.drop_column("attempt")
