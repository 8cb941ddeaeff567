"""API keys; a tenant on jobs, datasets and weights

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.auth.models import ROLE_CHECK
from app.auth.principal import DEFAULT_TENANT, PUBLISHED_TENANT

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TENANT_TABLES = ("jobs", "datasets", "weights")


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(ROLE_CHECK, name=op.f("ck_api_keys_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_tenant"), ["tenant"], unique=False)

    # Everything made before tenants existed belongs to the first admin key's tenant.
    for table in TENANT_TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column("tenant", sa.String(length=64), nullable=False, server_default=DEFAULT_TENANT)
            )
    op.execute(
        sa.text("UPDATE weights SET tenant = :published WHERE source = 'folder'").bindparams(
            published=PUBLISHED_TENANT
        )
    )
    for table in TENANT_TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column("tenant", server_default=None)
            batch_op.create_index(batch_op.f(f"ix_{table}_tenant"), ["tenant"], unique=False)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("scope", sa.String(length=64), nullable=True))
    with op.batch_alter_table("weights", schema=None) as batch_op:
        batch_op.drop_constraint("uq_weights_sha256", type_="unique")
        batch_op.create_unique_constraint(batch_op.f("uq_weights_tenant"), ["tenant", "sha256"])


def downgrade() -> None:
    with op.batch_alter_table("weights", schema=None) as batch_op:
        batch_op.drop_constraint("uq_weights_tenant", type_="unique")
        batch_op.create_unique_constraint(batch_op.f("uq_weights_sha256"), ["sha256"])
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("scope")
    for table in TENANT_TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(batch_op.f(f"ix_{table}_tenant"))
            batch_op.drop_column("tenant")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_tenant"))
    op.drop_table("api_keys")
