"""The FastAPI application."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.artifacts.router import router as artifacts_router
from app.datasets.router import router as datasets_router
from app.errors import AppError
from app.health.router import router as health_router
from app.jobs.router import router as jobs_router
from app.prediction.router import router as prediction_router
from app.settings import get_settings

logger = logging.getLogger(__name__)


async def _app_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    body: dict[str, object] = {"detail": exc.message, "code": exc.code}
    if exc.details is not None:
        body["errors"] = exc.details
    return JSONResponse(body, status_code=exc.status_code)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    summary = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
    return JSONResponse({"detail": errors, "code": "invalid_input", "message": summary}, status_code=422)


def create_app() -> FastAPI:
    """Build the API. Nothing here imports torch or super-gradients."""
    settings = get_settings()
    settings.ensure_dirs()
    app = FastAPI(
        title="sg-jobs",
        version="0.1.0",
        description="Fine-tune YOLO-NAS object detectors with super-gradients over HTTP.",
    )
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.include_router(health_router)
    app.include_router(jobs_router)
    app.include_router(datasets_router)
    app.include_router(artifacts_router)
    app.include_router(prediction_router)
    return app
