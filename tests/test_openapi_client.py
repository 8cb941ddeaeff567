"""A client generated from the running service's own /openapi.json works for every route (both backends).

openapi-python-client generates a package from the schema the service serves (no network: the
schema is fetched from the service and read from a file); every operation is then called through it
with real inputs (an uploaded dataset, a trained job, a PNG), and its answers parse into the
generated models: the success models, and `Problem` for errors (RFC 9457 problem details).

Each test declares the operations it calls with `@operations(...)` and fails if it did not call one
of them; `test_every_operation_in_the_schema_is_called` fails when the schema has an operation no test
declares, so a new route needs a call here.
"""

from __future__ import annotations

import functools
import importlib
import io
import json
import pkgutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import attrs
import httpx
import pytest
from PIL import Image, ImageDraw
from sqlalchemy import update

from app.datasets.demo import ShapesSpec, write_shapes_dataset
from app.db import session_scope
from app.jobs.models import Job
from app.settings import Settings
from app.sse import messages
from tests.prediction.helpers import job_without_checkpoint, trained_job
from tests.support import Service, tiny_spec, zip_folder
from tests.weights.standins import FIVE_CLASSES

pytestmark = pytest.mark.slow  # needs a trained job (shared with tests/prediction: about 30 s on a CPU)

PACKAGE = "sgjobs_client"
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
PROBLEM_JSON = "application/problem+json"
SHAPES = ShapesSpec(splits=(("train", 6), ("valid", 3)), min_size=64, max_size=96)

F = TypeVar("F", bound=Callable[..., None])


# --------------------------------------------------------------------------------------------------
# The generated client


@dataclass
class Generated:
    """The generated package, imported, with the schema it was generated from."""

    package: ModuleType
    schema: dict[str, Any]
    warnings: str
    operations: dict[str, ModuleType]  # operation id -> its generated module (`sync_detailed`, ...)

    def model(self, name: str) -> type:
        cls: type = getattr(self.package.models, name)
        return cls


def _generate(schema: dict[str, Any], workdir: Path) -> tuple[Path, str]:
    """Run openapi-python-client on the schema file; the package is `<workdir>/out/sgjobs_client`."""
    schema_file = workdir / "openapi.json"
    schema_file.write_text(json.dumps(schema))
    config_file = workdir / "openapi-python-client.json"
    # A fixed package name whatever the schema's title; no post hooks (they would run ruff on the
    # generated code: slow, and not what is tested here).
    config_file.write_text(
        json.dumps({"project_name_override": PACKAGE, "package_name_override": PACKAGE, "post_hooks": []})
    )
    out = workdir / "out"
    cmd = [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(schema_file)]
    cmd += ["--config", str(config_file), "--meta", "none", "--output-path", str(out / PACKAGE)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"openapi-python-client failed ({done.returncode}):\n{output}"
    return out, _summarize_warnings(output)


def _summarize_warnings(output: str) -> str:
    """The generator's warnings, one line each: 'WARNING parsing POST /x within y. <what>'."""
    lines = [line.strip() for line in output.splitlines()]
    found = []
    for i, line in enumerate(lines):
        if line.startswith(("WARNING", "ERROR")):
            what = next((x for x in lines[i + 1 :] if x and not x.startswith(("{", "}", '"'))), "")
            found.append(f"{line} {what}")
    return "\n".join(dict.fromkeys(found))


@pytest.fixture(scope="module")
def generated(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Generated]:
    response = service.client.get("/openapi.json")
    assert response.status_code == 200, response.text
    schema: dict[str, Any] = response.json()
    out, warnings = _generate(schema, tmp_path_factory.mktemp(f"client-{service.backend}"))
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
        del sys.modules[name]  # the other backend's copy
    sys.path.insert(0, str(out))
    try:
        package = importlib.import_module(PACKAGE)
        importlib.import_module(f"{PACKAGE}.models")
        api = importlib.import_module(f"{PACKAGE}.api")
        operations = {}
        for info in pkgutil.walk_packages(api.__path__, f"{PACKAGE}.api."):
            module = importlib.import_module(info.name)
            if hasattr(module, "sync_detailed"):
                operations[info.name.rsplit(".", 1)[-1]] = module
        yield Generated(package, schema, warnings, operations)
    finally:
        sys.path.remove(str(out))


@dataclass
class Api:
    """Calls operations through the generated client by operation id, and records which were called."""

    generated: Generated
    client: Any
    called: set[str] = field(default_factory=set)
    last: httpx.Response | None = None

    def __call__(self, operation_id: str, /, *args: Any, **kwargs: Any) -> Any:
        module = self.generated.operations.get(operation_id)
        assert module is not None, f"the generated client has no operation {operation_id!r}"
        self.called.add(operation_id)
        self.last = None
        try:
            return module.sync_detailed(*args, client=self.client, **kwargs)
        except self.generated.package.errors.UnexpectedStatus as exc:
            raise AssertionError(
                f"{operation_id}: status {exc.status_code} is not documented in the schema: "
                f"{exc.content[:2000]!r}"
            ) from None
        except Exception as exc:
            last = self.last
            seen = (
                f"{last.status_code} {last.headers.get('content-type')}: {last.text[:2000]}" if last else "-"
            )
            raise AssertionError(f"{operation_id}: the generated client failed on the answer {seen}") from exc

    def ok(self, operation_id: str, expect: int, model: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call; assert the status and that the answer parsed into the generated model `model`."""
        response = self(operation_id, *args, **kwargs)
        assert response.status_code == expect, f"{operation_id}: {response.status_code} {response.content!r}"
        expected = self.generated.model(model)
        assert isinstance(response.parsed, expected), (
            f"{operation_id}: parsed as {type(response.parsed).__name__}, not {model}: {response.content!r}"
        )
        return response.parsed

    def problem(self, operation_id: str, expect: int, /, *args: Any, **kwargs: Any) -> Any:
        """Call; assert an RFC 9457 problem with this status, parsed into the generated `Problem`."""
        problem = self.ok(operation_id, expect, "Problem", *args, **kwargs)
        response = self.last
        assert response is not None
        assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
        assert problem.status == expect
        for name in ("type_", "title", "detail"):  # the generator renames `type` to `type_`
            value = getattr(problem, name)
            assert isinstance(value, str) and value, (
                f"{operation_id}: problem without {name}: {response.text}"
            )
        return problem


def _make_api(generated: Generated, service: Service) -> Api:
    api: Api | None = None

    def keep(response: httpx.Response) -> None:
        assert api is not None
        api.last = response

    client = generated.package.Client(
        base_url=service.base_url,
        headers=service.headers,
        timeout=httpx.Timeout(600.0),
        raise_on_unexpected_status=True,
        httpx_args={"event_hooks": {"response": [keep]}},
    )
    api = Api(generated, client)
    return api


@pytest.fixture
def api(generated: Generated, service: Service) -> Api:
    return _make_api(generated, service)


def operations(*ids: str) -> Callable[[F], F]:
    """Declare the operations a test calls; the test fails if it does not call each of them."""

    def decorate(test: F) -> F:
        @functools.wraps(test)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            test(*args, **kwargs)
            missing = set(ids) - kwargs["api"].called
            assert not missing, f"{test.__name__} declares operations it did not call: {sorted(missing)}"

        wrapper.operations = frozenset(ids)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


# --------------------------------------------------------------------------------------------------
# Test data


def _png() -> bytes:
    image = Image.new("RGB", (96, 80), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 10, 40, 40), fill=(200, 30, 30))
    draw.ellipse((50, 30, 85, 65), fill=(30, 30, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _file(generated: Generated, data: bytes, name: str, mime: str) -> Any:
    return generated.package.types.File(payload=io.BytesIO(data), file_name=name, mime_type=mime)


def _upload(api: Api, tmp: Path, name: str) -> Any:
    """Upload a small COCO dataset as multipart through the generated client."""
    root = write_shapes_dataset(tmp / name, SHAPES)
    body_type = _body_type(api.generated, "upload_dataset", "to_multipart")
    body = body_type(file=_file(api.generated, zip_folder(root), f"{name}.zip", "application/zip"))
    dataset = api.ok("upload_dataset", 201, "DatasetOut", body=body, name=name)
    assert dataset.status == "ready" or getattr(dataset.status, "value", None) == "ready", dataset
    return dataset


def _body_type(generated: Generated, operation_id: str, method: str) -> type:
    """The generated request-body class of an operation that has the method (`to_multipart`, `to_dict`)."""
    import typing

    hints = typing.get_type_hints(generated.operations[operation_id].sync_detailed)
    candidates = typing.get_args(hints["body"]) or (hints["body"],)
    for candidate in candidates:
        if isinstance(candidate, type) and hasattr(candidate, method) and attrs.has(candidate):
            return candidate
    raise AssertionError(f"{operation_id}: no body type with {method} in {candidates}")


def _json_body_type(generated: Generated, operation_id: str) -> type:
    """The generated JSON request-body class of an operation that also takes multipart."""
    import typing

    hints = typing.get_type_hints(generated.operations[operation_id].sync_detailed)
    for candidate in typing.get_args(hints["body"]) or (hints["body"],):
        if isinstance(candidate, type) and attrs.has(candidate) and not hasattr(candidate, "to_multipart"):
            return candidate
    raise AssertionError(f"{operation_id}: no JSON body type in {hints['body']}")


def _spec(generated: Generated, dataset: dict[str, Any], name: str, **overrides: Any) -> Any:
    spec = tiny_spec("unused", name=name, dataset=dataset, **overrides)
    return _body_type(generated, "create_job", "to_dict").from_dict(spec)  # type: ignore[attr-defined]


def _status(value: Any) -> str:
    return str(getattr(value, "value", value))


@dataclass
class Trained:
    dataset_id: str
    job_id: str


@pytest.fixture(scope="module")
def trained(generated: Generated, service: Service, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """The tiny trained job the prediction and artifacts tests share (trained once per service), and a
    dataset uploaded through the generated client for the jobs these tests create."""
    job = trained_job(service)
    dataset = _upload(_make_api(generated, service), tmp_path_factory.mktemp("trained"), "client-jobs")
    return Trained(dataset.id, job["id"])


# --------------------------------------------------------------------------------------------------
# The schema and the generator


def test_the_generator_reports_no_warnings(generated: Generated) -> None:
    """A warning means part of the schema (a body, a response) is missing from the generated client."""
    if generated.warnings:
        pytest.fail(f"openapi-python-client warned:\n{generated.warnings}", pytrace=False)


def test_every_operation_has_a_generated_function(generated: Generated) -> None:
    ids = _schema_operation_ids(generated.schema)
    assert set(generated.operations) == set(ids), (
        f"schema: {sorted(ids)}; generated: {sorted(generated.operations)}"
    )


def _schema_operation_ids(schema: dict[str, Any]) -> dict[str, str]:
    ids: dict[str, str] = {}
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                label = f"{method.upper()} {path}"
                assert operation.get("operationId"), f"{label} has no operationId"
                assert operation["operationId"] not in ids, f"operationId used twice: {label}"
                ids[operation["operationId"]] = label
    return ids


def test_every_operation_in_the_schema_is_called(generated: Generated) -> None:
    declared: set[str] = set()
    for value in globals().values():
        declared |= getattr(value, "operations", frozenset())
    ids = _schema_operation_ids(generated.schema)
    missing = {op: label for op, label in ids.items() if op not in declared}
    assert not missing, f"operations no test here calls (add a test with @operations): {missing}"
    stale = declared - set(ids)
    assert not stale, f"tests declare operations the schema does not have: {sorted(stale)}"


# --------------------------------------------------------------------------------------------------
# Every operation


@operations("healthz", "readyz")
def test_health(api: Api) -> None:
    assert _status(api.ok("healthz", 200, "Health").status) == "ok"
    readiness = api.ok("readyz", 200, "Readiness")
    assert _status(readiness.status) == "ok"
    assert readiness.checks.additional_properties == {"database": "ok", "workers": "ok", "broker": "ok"}


@operations("get_metrics")
def test_metrics(api: Api) -> None:
    response = api("get_metrics")
    assert response.status_code == 200, response.content
    assert response.headers["content-type"].startswith("text/plain")
    assert isinstance(response.parsed, str) and "\nsgjobs_queue_depth " in response.parsed


@operations("upload_dataset", "list_datasets", "get_dataset", "validate_dataset", "delete_dataset")
def test_datasets(api: Api, tmp_path: Path) -> None:
    dataset = _upload(api, tmp_path, "client-upload")
    assert dataset.format_ == "coco" or _status(dataset.format_) == "coco"
    assert dataset.classes == ["circle", "square", "triangle"]

    page = api.ok("list_datasets", 200, "DatasetPage", limit=200)
    assert dataset.id in [d.id for d in page.items] and page.total >= 1
    assert api.ok("get_dataset", 200, "DatasetOut", dataset.id).id == dataset.id
    report = api.ok("validate_dataset", 200, "ValidationReport", dataset.id)
    assert report.ok and report.errors == 0

    # The raw archive as the body (the generated client sends it as application/octet-stream).
    raw = api.ok(
        "upload_dataset",
        201,
        "DatasetOut",
        body=_file(api.generated, zip_folder(tmp_path / "client-upload"), "", ""),
        name="client-raw",
    )
    assert raw.id != dataset.id and raw.classes == dataset.classes

    # A file that is not an archive is a problem with the status the schema documents.
    junk = _file(api.generated, b"not an archive", "junk.zip", "application/zip")
    api.problem(
        "upload_dataset", 422, body=_body_type(api.generated, "upload_dataset", "to_multipart")(file=junk)
    )

    delete = api("delete_dataset", dataset.id)
    assert delete.status_code == 204 and delete.content == b""
    api.problem("get_dataset", 404, dataset.id)
    api.problem("delete_dataset", 404, dataset.id)
    api.problem("validate_dataset", 404, dataset.id)


@operations(
    "create_job",
    "get_job",
    "list_jobs",
    "list_job_metrics",
    "list_job_events",
    "stream_job",
    "list_job_webhooks",
)
def test_jobs(api: Api, trained: Trained) -> None:
    job = api.ok("get_job", 200, "JobOut", trained.job_id)
    assert _status(job.status) == "succeeded"

    status = api.generated.model("JobStatus")("succeeded")
    page = api.ok("list_jobs", 200, "JobPage", status=status, limit=200)
    assert trained.job_id in [j.id for j in page.items]
    assert all(_status(j.status) == "succeeded" for j in page.items)

    metrics = api.ok("list_job_metrics", 200, "MetricPage", trained.job_id, limit=10000)
    assert metrics.items and all(isinstance(m.value, float | int) for m in metrics.items)
    assert metrics.next_cursor
    later = api.ok("list_job_metrics", 200, "MetricPage", trained.job_id, cursor=metrics.next_cursor)
    assert later.items == []
    events = api.ok("list_job_events", 200, "EventPage", trained.job_id, limit=5000)
    assert events.items
    # Trained without a webhook: no messages (tests/webhooks has jobs with them).
    assert api.ok("list_job_webhooks", 200, "WebhookDeliveryList", trained.job_id).items == []
    # The stream of a finished job: its history, then its (terminal) status. The generated client
    # gives the event stream's text as it came.
    stream = api("stream_job", trained.job_id)
    assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
    received = [m for m in messages(stream.content.decode().splitlines()) if m.comment is None]
    assert sum(m.event == "metric" for m in received) == len(metrics.items)
    assert received[-1].event == "status" and received[-1].json()["status"] == "succeeded"

    # Errors: an unknown job, a spec naming a dataset folder that does not exist, a bad query value.
    for operation in ("get_job", "list_job_metrics", "list_job_events", "stream_job", "list_job_webhooks"):
        assert api.problem(operation, 404, "no-such-job").status == 404
    problem = api.problem(
        "create_job", 422, body=_spec(api.generated, {"format": "coco", "path": "nope"}, "x")
    )
    assert problem.errors, problem
    error = problem.errors[0]
    assert error.loc[0] == "body" and error.msg and error.type_
    problem = api.problem("list_jobs", 422, limit=0)
    assert problem.errors and problem.errors[0].loc == ["query", "limit"]


@operations("create_job", "cancel_job")
def test_cancel(api: Api, trained: Trained, service: Service) -> None:
    job = api.ok("create_job", 201, "JobOut", body=_spec(api.generated, {"id": trained.dataset_id}, "cancel"))
    cancelled = api.ok("cancel_job", 202, "JobOut", job.id)
    assert cancelled.id == job.id
    assert _status(cancelled.status) in ("cancelled", "running", "queued")
    # Idempotent; and wait for the end so the worker is free for the next tests.
    api.ok("cancel_job", 202, "JobOut", job.id)
    assert service.wait(job.id, timeout=300)["status"] == "cancelled"
    api.problem("cancel_job", 404, "no-such-job")


@operations("create_job", "cancel_job", "resume_job", "delete_job", "get_job")
def test_resume_and_delete(api: Api, trained: Trained, service: Service, service_settings: Settings) -> None:
    problem = api.problem("resume_job", 409, trained.job_id)
    assert "already succeeded" in problem.detail
    api.problem("resume_job", 404, "no-such-job")
    api.problem("delete_job", 404, "no-such-job")

    # A job on a dataset the worker refuses at once (its annotations are broken), so that whatever
    # reaches the worker ends in seconds; cancelled before it ran, it has no checkpoint.
    broken = write_shapes_dataset(service.datasets_dir / "client-broken", SHAPES)
    (broken / "train" / "_annotations.coco.json").write_text("[]")
    spec = _spec(
        api.generated, {"format": "coco", "path": "client-broken"}, "resume", training={"max_epochs": 2}
    )
    job = api.ok("create_job", 201, "JobOut", body=spec)
    api.ok("cancel_job", 202, "JobOut", job.id)
    service.wait(job.id, timeout=300)
    assert "no checkpoint" in api.problem("resume_job", 409, job.id).detail

    # With a (stand-in) checkpoint in its directory it can be resumed, with more epochs only.
    job_dir = service_settings.jobs_dir / job.id
    checkpoint = job_dir / "checkpoints" / "train" / "RUN_1" / "ckpt_latest.pth"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"stand-in")
    with session_scope(service_settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job.id).values(job_dir=str(job_dir)))
    request = api.generated.model("ResumeRequest")
    problem = api.problem("resume_job", 422, job.id, body=request(max_epochs=1))
    assert problem.errors and problem.errors[0].loc == ["body", "max_epochs"]
    resumed = api.ok("resume_job", 202, "JobOut", job.id, body=request(max_epochs=3))
    assert resumed.id == job.id and _status(resumed.status) == "queued"
    assert resumed.progress.max_epochs == 3
    assert service.wait(job.id, timeout=300)["status"] == "failed"

    # Deleted: rows and directory; a second delete is a 404.
    delete = api("delete_job", job.id)
    assert delete.status_code == 204 and delete.content == b""
    assert not job_dir.exists()
    api.problem("get_job", 404, job.id)
    api.problem("delete_job", 404, job.id)

    # A queued job cannot be deleted until it is cancelled.
    queued = job_without_checkpoint(service_settings)
    assert "cancel it first" in api.problem("delete_job", 409, queued).detail
    api.ok("cancel_job", 202, "JobOut", queued)
    assert api("delete_job", queued).status_code == 204


@operations("list_artifacts", "download_artifact", "export_job")
def test_artifacts_and_export(api: Api, trained: Trained, service: Service) -> None:
    listing = api.ok("list_artifacts", 200, "ArtifactList", trained.job_id)
    assert listing.items
    # The smallest file, and one in a subfolder (its name has a slash) if there is one.
    chosen = {min(listing.items, key=lambda a: a.size).name}
    chosen |= {a.name for a in listing.items if "/" in a.name and a.size < 50_000_000}
    for name in sorted(chosen)[:2]:
        size = next(a.size for a in listing.items if a.name == name)
        response = api("download_artifact", trained.job_id, name)
        assert response.status_code == 200, (name, response.content[:500])
        assert response.parsed is not None and len(response.parsed.payload.read()) == size, name
    api.problem("download_artifact", 404, trained.job_id, "no-such-file.txt")
    api.problem("list_artifacts", 404, "no-such-job")

    # The body is optional ("ExportOptions or null"): the generated client sends the options it is given, or
    # none with body=None (left unset, it fails to serialize its placeholder: openapi-python-client 0.29).
    options = api.generated.model("ExportOptions")()
    export = api.ok("export_job", 200, "ExportOut", trained.job_id, body=options)
    assert export.artifact.name.endswith(".onnx") and export.artifact.size > 0
    onnx = api("download_artifact", trained.job_id, export.artifact.name)
    assert onnx.status_code == 200 and len(onnx.parsed.payload.read()) == export.artifact.size
    api.problem("export_job", 404, "no-such-job", body=None)


@operations("create_job", "export_job", "predict", "get_predict_stats")
def test_predict(api: Api, trained: Trained, service: Service) -> None:
    body_type = _body_type(api.generated, "predict", "to_multipart")
    png = _png()
    result = api.ok(
        "predict",
        200,
        "PredictResponse",
        body=body_type(job_id=trained.job_id, files=[_file(api.generated, png, "a.png", "image/png")]),
    )
    assert len(result.images) == 1
    image = result.images[0]
    assert isinstance(image.detections, list)
    stats = api.ok("get_predict_stats", 200, "PredictStats")
    assert stats.model_loads >= 1

    api.problem(
        "predict",
        404,
        body=body_type(job_id="no-such-job", files=[_file(api.generated, png, "a.png", "image/png")]),
    )
    not_an_image = _file(api.generated, b"plain text", "notes.txt", "text/plain")
    api.problem("predict", 415, body=body_type(job_id=trained.job_id, files=[not_an_image]))

    # A job with no checkpoint (cancelled before it ran): 409 for predict and export.
    job = api.ok(
        "create_job", 201, "JobOut", body=_spec(api.generated, {"id": trained.dataset_id}, "no-ckpt")
    )
    service.client.post(f"/jobs/{job.id}/cancel")
    service.wait(job.id, timeout=300)
    api.problem(
        "predict", 409, body=body_type(job_id=job.id, files=[_file(api.generated, png, "a.png", "image/png")])
    )
    api.problem("export_job", 409, job.id, body=None)


@operations(
    "create_weights",
    "list_weights",
    "get_weights",
    "delete_weights",
    "export_weights",
    "download_weights_artifact",
    "predict",
)
def test_weights(api: Api, trained: Trained, standins: Path) -> None:
    form = _body_type(api.generated, "create_weights", "to_multipart")
    data = (standins / "s5_named.pth").read_bytes()

    def checkpoint() -> Any:
        return _file(api.generated, data, "s5.pth", "application/octet-stream")

    created = api("create_weights", body=form(file=checkpoint(), name="client-s5"))
    # 201, or 200 when another test registered the same file first: the same model either way.
    assert created.status_code in (200, 201), created.content
    weights = created.parsed
    assert isinstance(weights, api.generated.model("WeightsOut")), created.content
    assert weights.classes == FIVE_CLASSES and weights.num_classes == 5
    assert api.ok("create_weights", 200, "WeightsOut", body=form(file=checkpoint())).id == weights.id

    promote = _json_body_type(api.generated, "create_weights")
    promoted = api("create_weights", body=promote.from_dict({"from_job": trained.job_id}))  # type: ignore[attr-defined]
    assert promoted.status_code in (200, 201), promoted.content
    assert promoted.parsed.classes == ["circle", "square", "triangle"]

    # Promoted weights predict and export as their job does.
    predict_form = _body_type(api.generated, "predict", "to_multipart")
    image = _file(api.generated, _png(), "a.png", "image/png")
    result = api.ok(
        "predict", 200, "PredictResponse", body=predict_form(weights_id=promoted.parsed.id, files=[image])
    )
    assert result.weights_id == promoted.parsed.id and result.classes == ["circle", "square", "triangle"]
    export = api.ok("export_weights", 200, "ExportOut", promoted.parsed.id, body=None)
    assert export.weights_id == promoted.parsed.id and export.artifact.size > 0
    onnx = api("download_weights_artifact", promoted.parsed.id, export.artifact.name)
    assert onnx.status_code == 200 and len(onnx.parsed.payload.read()) == export.artifact.size
    api.problem("download_weights_artifact", 404, promoted.parsed.id, "no-such-file")
    api.problem("export_weights", 404, "no-such-weights", body=None)

    page = api.ok("list_weights", 200, "WeightsPage", limit=200)
    assert {weights.id, promoted.parsed.id} <= {w.id for w in page.items}
    assert api.ok("get_weights", 200, "WeightsOut", weights.id).sha256 == weights.sha256

    junk = _file(api.generated, b"not a checkpoint", "junk.pth", "application/octet-stream")
    assert "checkpoint" in api.problem("create_weights", 422, body=form(file=junk)).detail
    api.problem("create_weights", 422, body=promote.from_dict({"from_job": "no-such-job"}))  # type: ignore[attr-defined]
    api.problem("list_weights", 422, limit=0)

    delete = api("delete_weights", weights.id)
    assert delete.status_code == 204 and delete.content == b""
    api.problem("get_weights", 404, weights.id)
    api.problem("delete_weights", 404, weights.id)
