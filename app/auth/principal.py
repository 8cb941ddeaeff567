"""Who is calling, and the one rule for which objects a caller may see."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, true

from app.auth.models import Role

# The tenant of the first admin key and of every object made before tenants existed.
DEFAULT_TENANT = "default"
# Weights published in the weights folder by the operator: every tenant may start from them and
# predict with them, only an admin may delete them. A tenant name cannot start with "_".
PUBLISHED_TENANT = "_published"
# Tenant names are folder names in the datasets directory: lower case, so that two tenants never
# share a folder on a case-insensitive file system.
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


@dataclass(frozen=True)
class Principal:
    """The caller: the key it used, its tenant and role."""

    key_id: str
    tenant: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == Role.admin

    @property
    def scope(self) -> str | None:
        """The one tenant whose objects the caller sees; None for an admin, who sees them all."""
        return None if self.is_admin else self.tenant


def visible(column: Any, scope: str | None, *shared: str) -> ColumnElement[bool]:
    """A WHERE clause: the rows of `scope`'s tenant (and of the `shared` ones); all rows for None."""
    if scope is None:
        return true()
    return column.in_([scope, *shared]) if shared else column == scope


def sees(owner: str, scope: str | None, *shared: str) -> bool:
    """Whether a caller of `scope` may see an object of tenant `owner` (the rule of `visible`)."""
    return scope is None or owner == scope or owner in shared
