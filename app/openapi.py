"""The OpenAPI document: short operation ids, and every error declared as problem details."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel

from app.errors import PROBLEM_MEDIA_TYPE, Problem

# Why each status can happen, as the docs show it; a route lists the ones it can answer.
_DESCRIPTIONS: dict[int, str] = {
    400: "The body cannot be parsed (not UTF-8 JSON).",
    401: "No API key, or an unknown or revoked one (`WWW-Authenticate` says which).",
    403: "The key may not do this.",
    404: "No such object.",
    409: "The object's state does not allow this.",
    413: "Over a size limit (the problem names it).",
    415: "The body's media type is not accepted.",
    422: "Invalid input (field errors in `errors`, dataset problems in `problems`).",
    429: "Over a quota that frees up with time (the problem names it); retry after `Retry-After` seconds.",
    503: "The database or the inference process is unavailable; retry after `Retry-After` seconds.",
}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route that can answer these error statuses, each with a problem body."""
    return {status: {"model": Problem, "description": _DESCRIPTIONS[status]} for status in statuses}


def form_body(form: type[BaseModel], **raw: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra=` for a route that parses its body by hand (to enforce limits while reading):
    a multipart form described by the model `form` (`bytes` fields are files), plus `raw` media
    types (media type -> schema) also accepted as the whole body."""
    schema = form.model_json_schema()
    for name, prop in schema["properties"].items():
        # A form field is sent or left out, never null: `str | None` is documented as a string.
        options = [o for o in prop.pop("anyOf", []) if o != {"type": "null"}]
        if options:
            schema["properties"][name] = (
                {**prop, **options[0]} if len(options) == 1 else {**prop, "anyOf": options}
            )
    content: dict[str, Any] = {"multipart/form-data": {"schema": schema}}
    content.update({media_type: {"schema": schema} for media_type, schema in raw.items()})
    return {"requestBody": {"required": True, "content": content}}


def operation_id(route: APIRoute) -> str:
    """The route function's name (`create_job`, `list_jobs`, ...): short, stable, unique."""
    return route.name


def _problem_media_type(schema: dict[str, Any]) -> None:
    # FastAPI declares every response model as application/json; problems are application/problem+json.
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                schema_ref = content.get("application/json", {}).get("schema", {}).get("$ref", "")
                if status[0] in "45" and schema_ref.endswith(f"/{Problem.__name__}"):
                    content[PROBLEM_MEDIA_TYPE] = content.pop("application/json")


def install_openapi(app: FastAPI) -> None:
    """Generate the document once, with problem media types, and check operation ids are unique."""
    seen: set[str] = set()
    for route in app.routes:
        if isinstance(route, APIRoute):
            if route.name in seen:
                raise RuntimeError(f"two routes are named {route.name!r}: operation ids must be unique")
            seen.add(route.name)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
                tags=app.openapi_tags,
            )
            _problem_media_type(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
