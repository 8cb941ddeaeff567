"""GET /metrics: the Prometheus text format, for an admin key (the numbers span every tenant)."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session

from app.api import PrincipalDep, SessionDep, SettingsDep
from app.errors import Forbidden
from app.observability import collectors
from app.observability.metrics import REGISTRY
from app.openapi import problems
from app.settings import Settings

router = APIRouter(tags=["observability"])

# The text format generate_latest writes (with the default escaping, names are plain Prometheus names);
# documented as text/plain, its parameters (version 0.0.4, UTF-8) in the description.
MEDIA_TYPE = CONTENT_TYPE_PLAIN_0_0_4


class _Scrape(Collector):
    """One scrape: this process's instruments, then what the database and the inference handle say."""

    def __init__(self, session: Session, settings: Settings) -> None:
        self._session = session
        self._settings = settings

    def collect(self) -> Iterator[collectors.Metric]:
        yield from REGISTRY.collect()
        yield from collectors.job_metrics(self._session)
        yield from collectors.inference_metrics(self._settings)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Every metric, each name prefixed `sgjobs_`, in the Prometheus text format "
            f"(`{MEDIA_TYPE}`).",
        },
        **problems(403, 503),
    },
)
def get_metrics(session: SessionDep, settings: SettingsDep, principal: PrincipalDep) -> Response:
    """Prometheus metrics (admin keys only: they count every tenant's jobs): jobs by status, queue
    depth and age, running jobs' heartbeat age and images/s, request latency by route, predictions'
    latency and model cache hits and misses."""
    if not principal.is_admin:
        raise Forbidden("GET /metrics counts every tenant's jobs: scrape it with an admin key")
    return Response(generate_latest(_Scrape(session, settings)), media_type=MEDIA_TYPE)
