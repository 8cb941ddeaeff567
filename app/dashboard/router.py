"""`GET /` and the dashboard's static files. They hold no data, so they load without a key; the page
asks for one and sends it with every API request (fetch, `Authorization: Bearer`). None of these
routes is part of the API's OpenAPI document.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from app.errors import NotFound

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The files the page is made of, and their media types: nothing else under static/ is served.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# No inline script or style, nothing from another origin, never framed (clickjacking).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Upgrades ship new files under the same names.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _file(name: str, media_type: str) -> Response:
    return Response((STATIC_DIR / name).read_bytes(), media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/")
def index() -> Response:
    """The dashboard page."""
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/dashboard/{name}")
def asset(name: str) -> Response:
    """One of the page's scripts or style sheets."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"no dashboard file {name!r}")
    return _file(name, media_type)
