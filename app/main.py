"""The FastAPI application: the composition root, where the areas are wired together."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app.api import get_principal
from app.artifacts.router import router as artifacts_router
from app.artifacts.router import weights_router as weights_artifacts_router
from app.auth.cache import KeyCache
from app.dashboard.router import router as dashboard_router
from app.datasets.router import router as datasets_router
from app.error_handlers import install_error_handlers
from app.health.router import router as health_router
from app.jobs import lifecycle
from app.jobs.router import router as jobs_router
from app.jobs.service import checkpoint_to_promote, jobs_using_dataset, jobs_using_weights
from app.jobs.stream import StreamHub
from app.limits import JsonBodyLimit
from app.observability.middleware import RequestMetrics
from app.observability.router import router as observability_router
from app.openapi import install_openapi, operation_id, problems
from app.prediction import warm as model_warmer
from app.prediction.lookups import LookupCache
from app.prediction.router import document_limits as document_predict_limits
from app.prediction.router import router as prediction_router
from app.security import RequestGuard, allowed_hosts
from app.settings import Settings, get_settings
from app.webhooks import sender as webhook_sender
from app.weights import folder
from app.weights.router import router as weights_router
from app.weights.service import model_server_inspector

logger = logging.getLogger(__name__)


def _scan_weights_folder(settings: Settings) -> None:
    try:
        registered = folder.sync_folder(settings, model_server_inspector(settings))
        logger.info(
            "weights folder %s: %d published file(s) registered", settings.weights_dir, len(registered)
        )
    except Exception:  # a start-up nicety: a job asking for the file registers it (or says why not)
        logger.exception("scanning the weights folder %s failed", settings.weights_dir)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    # Published weights files put in the folder are registered at start, in the background: checking
    # one loads it in the inference process (seconds), and the API answers meanwhile.
    if folder.has_published_files(settings):
        threading.Thread(
            target=_scan_weights_folder, args=(settings,), name="weights-folder", daemon=True
        ).start()
    # Webhook messages are sent from here too, so a job cancelled while no worker runs is reported.
    stop = threading.Event()
    webhooks = webhook_sender.start(settings, note=lifecycle.note, stop=stop)
    warmer = model_warmer.start(settings, stop=stop)
    try:
        yield
    finally:
        stop.set()
        webhooks.join(timeout=settings.webhook_timeout_seconds)
        if warmer is not None:
            warmer.join(timeout=5)


def create_app() -> FastAPI:
    """Build the API. Nothing here imports torch or super-gradients."""
    settings = get_settings()
    settings.ensure_dirs()
    app = FastAPI(
        title="sg-jobs",
        version="0.1.0",
        description="Fine-tune YOLO-NAS object detectors with super-gradients over HTTP.",
        generate_unique_id_function=operation_id,
        lifespan=_lifespan,
    )
    # Datasets never import jobs; deleting one asks the jobs area who uses it through this.
    app.state.dataset_users = jobs_using_dataset
    # Likewise weights: who starts from them, and a job's best checkpoint to promote.
    app.state.weights_users = jobs_using_weights
    app.state.job_checkpoints = checkpoint_to_promote
    app.state.key_cache = KeyCache(settings.key_cache_seconds)
    # What /predict found for succeeded jobs and registered weights (`app.prediction.lookups`).
    app.state.predict_lookups = LookupCache(settings.predict_lookup_seconds)
    # The pollers behind GET /jobs/{id}/stream: one per job with open streams, in this process.
    app.state.job_streams = StreamHub(settings)
    install_error_handlers(app)
    app.add_middleware(JsonBodyLimit, max_bytes=settings.json_max_bytes)
    # Health checks answer anyone (load balancers, orchestrators); everything else needs a key.
    app.include_router(health_router)
    # The dashboard's page and files hold no data (it fetches everything with the user's key).
    app.include_router(dashboard_router)
    authenticated = [Depends(get_principal)]
    for router in (
        jobs_router,
        datasets_router,
        weights_router,
        artifacts_router,
        weights_artifacts_router,
        prediction_router,
        observability_router,
    ):
        app.include_router(router, dependencies=authenticated, responses=problems(401))
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After", "WWW-Authenticate"],
        )
    # Outermost: a request for a host name this service does not have is refused before anything.
    app.add_middleware(RequestGuard, hosts=allowed_hosts(settings), origins=settings.cors_origins)
    # Around everything, so every answer is timed, refusals and errors included.
    app.add_middleware(RequestMetrics, routes=app.routes)
    document_predict_limits(settings)
    install_openapi(app)
    return app
