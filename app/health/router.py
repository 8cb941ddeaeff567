"""Liveness and readiness."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from app import queue
from app.api import SessionDep, SettingsDep
from app.workers import service as workers

router = APIRouter(tags=["health"])


class Health(BaseModel):
    """The process answers."""

    status: Literal["ok"]


class Readiness(BaseModel):
    """Whether the database and the broker can be reached and a worker was seen recently; `checks`
    names each and its state."""

    status: Literal["ok", "unavailable"]
    checks: dict[str, str]


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process answers (no dependency is checked)."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={
        503: {
            "model": Readiness,
            "description": "The database or the broker is unreachable, or no worker was seen recently.",
        }
    },
)
async def readyz(session: SessionDep, settings: SettingsDep) -> JSONResponse:
    """Database and broker reachable, and a worker seen within one lease (503 otherwise, naming which:
    queued jobs would wait for nobody)."""
    checks: dict[str, str] = {}
    try:
        _, ago = await run_in_threadpool(workers.last_seen, session)
        checks["database"] = "ok"
        if ago is None:
            checks["workers"] = "error: no worker has been seen (start one: sgjobs worker)"
        elif ago > settings.lease_seconds:
            checks["workers"] = f"error: no worker seen for {ago:.0f} s"
        else:
            checks["workers"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {exc.__class__.__name__}"
    ok = await run_in_threadpool(queue.broker_reachable, settings)
    checks["broker"] = "ok" if ok else "error: unreachable"
    ready = all(v == "ok" for v in checks.values())
    body = Readiness(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
