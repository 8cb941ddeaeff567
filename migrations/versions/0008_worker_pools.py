"""workers: the pool each worker serves and the GPUs its training slot offers

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Workers seen before this revision served the default pool, one GPU (or a CPU) per slot.
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("queue", sa.String(length=64), server_default="", nullable=False))
        batch_op.add_column(sa.Column("gpus", sa.Integer(), server_default="1", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("gpus")
        batch_op.drop_column("queue")
