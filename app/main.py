"""The FastAPI application: the composition root, where the areas are wired together."""

from __future__ import annotations

from fastapi import FastAPI

from app.artifacts.router import router as artifacts_router
from app.datasets.router import router as datasets_router
from app.error_handlers import install_error_handlers
from app.health.router import router as health_router
from app.jobs.router import router as jobs_router
from app.jobs.service import jobs_using_dataset
from app.openapi import install_openapi, operation_id
from app.prediction.router import router as prediction_router
from app.settings import get_settings


def create_app() -> FastAPI:
    """Build the API. Nothing here imports torch or super-gradients."""
    settings = get_settings()
    settings.ensure_dirs()
    app = FastAPI(
        title="sg-jobs",
        version="0.1.0",
        description="Fine-tune YOLO-NAS object detectors with super-gradients over HTTP.",
        generate_unique_id_function=operation_id,
    )
    # Datasets never import jobs; deleting one asks the jobs area who uses it through this.
    app.state.dataset_users = jobs_using_dataset
    install_error_handlers(app)
    app.include_router(health_router)
    app.include_router(jobs_router)
    app.include_router(datasets_router)
    app.include_router(artifacts_router)
    app.include_router(prediction_router)
    install_openapi(app)
    return app
