"""Per-tenant quotas: how much one tenant may ask of the service at once.

Settings hold the defaults (`quota_*`) and per-tenant overrides (`tenant_quotas`). Admins act for
the operator and are not held to them. Over a quota that frees up with time (jobs finish) the answer
is 429 with Retry-After; over one that a smaller request would fit, 413 naming the quota.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.auth.principal import Principal
from app.datasets.models import Dataset
from app.errors import PayloadTooLarge, broken_limit
from app.settings import Settings
from app.weights.models import Weights


@dataclass(frozen=True)
class Quota:
    active_jobs: int
    storage_bytes: int
    epoch_pixels: int


def quota_for(settings: Settings, tenant: str) -> Quota:
    """The tenant's quota: the defaults, with the tenant's overrides."""
    overrides = settings.tenant_quotas.get(tenant, {})  # names checked by Settings
    return Quota(
        active_jobs=overrides.get("active_jobs", settings.quota_active_jobs),
        storage_bytes=overrides.get("storage_bytes", settings.quota_storage_bytes),
        epoch_pixels=overrides.get("epoch_pixels", settings.quota_epoch_pixels),
    )


def limit_details(name: str, value: int) -> list[dict[str, Any]]:
    """The `limits` member of a problem naming the quota `name`."""
    return broken_limit(f"quota_{name}", value)


def storage_used(session: Session, *, tenant: str) -> int:
    """Bytes of the tenant's uploaded datasets (extracted) and registered weights."""
    datasets = session.scalar(
        select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.tenant == tenant)
    )
    weights = session.scalar(
        select(func.coalesce(func.sum(Weights.size_bytes), 0)).where(Weights.tenant == tenant)
    )
    return int(datasets or 0) + int(weights or 0)


def check_storage(session: Session, *, settings: Settings, principal: Principal, adding: int) -> None:
    """Before an upload is kept: the tenant's storage with `adding` more bytes within its quota (413)."""
    if principal.is_admin:
        return
    quota = quota_for(settings, principal.tenant)
    used = storage_used(session, tenant=principal.tenant)
    if used + adding > quota.storage_bytes:
        raise PayloadTooLarge(
            f"this upload ({adding} bytes) would take the tenant's storage to {used + adding} bytes, over "
            f"its quota_storage_bytes ({quota.storage_bytes}); delete datasets or weights it no longer needs",
            details=limit_details("storage_bytes", quota.storage_bytes),
        )
