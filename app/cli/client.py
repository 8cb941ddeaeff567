"""The client side of `sgjobs`: submit, ls, show, logs, cancel, resume, predict, datasets upload and
download, over the service's HTTP API only (`app.cli.http`).

Exit codes: 0 done (a followed job succeeded); 1 an API or connection error; 2 a usage error;
3 a followed job failed; 4 a followed job was cancelled; 130 detached with Ctrl-C (the job goes on).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from app.cli.http import CHUNK_BYTES, EXPORT_TIMEOUT, Api, CliError, Config, Message
from app.jobs.states import JobStatus
from app.ml.types import BATCH_PREFIX

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_CANCELLED = 4
EXIT_DETACHED = 130
EXIT_CODES_HELP = (
    "Exit codes: 0 done (a followed job succeeded), 1 API or connection error, 2 usage error, "
    "3 the followed job failed, 4 the followed job was cancelled, 130 detached with Ctrl-C "
    "(the job goes on)."
)
# Archive members stored as they are: already compressed, deflating them again only costs time.
STORED_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".zip", ".gz", ".parquet", ".arrow"})
# How often the plain-text view of a followed job (not a terminal) prints a progress line.
LINE_EVERY_SECONDS = 10.0

console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

AsJson = Annotated[
    bool, typer.Option("--json", help="Print the API's JSON answers (one object per line when following).")
]
JobId = Annotated[str, typer.Argument(help="The job's id.", show_default=False)]
Follow = Annotated[
    bool,
    typer.Option(
        "--follow", "-f", help="Follow the job live until it ends; Ctrl-C detaches (the job goes on)."
    ),
]


class UsageError(CliError):
    exit_code = EXIT_USAGE


def _fail(error: CliError) -> NoReturn:
    # Plain text, never re-wrapped: scripts and people read the API's message as it is.
    print(f"error: {error.message}", file=sys.stderr, flush=True)
    raise typer.Exit(error.exit_code)


@contextmanager
def _api() -> Iterator[Api]:
    """The API client; a `CliError` inside becomes its message on stderr and its exit code."""
    try:
        with Api(Config.from_env()) as api:
            yield api
    except CliError as error:
        _fail(error)


def _print_json(data: Any) -> None:
    # Plain print, not rich: scripts get exactly one JSON document per line.
    print(json.dumps(data), flush=True)


# --- formatting ------------------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _time(value: str | None) -> str:
    if not value:
        return "-"
    return datetime.fromisoformat(value).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _best(job: dict[str, Any]) -> str:
    best = job.get("best_metric") or {}
    value = best.get("value")
    return f"{best.get('name')} {value:.4f}" if value is not None else f"{best.get('name')} -"


def _epoch(progress: dict[str, Any]) -> str:
    epoch = progress.get("epoch")
    return f"{epoch + 1}/{progress['max_epochs']}" if epoch is not None else f"-/{progress['max_epochs']}"


def _batch(progress: dict[str, Any]) -> str:
    if progress.get("batch") is None:
        return "-"
    return f"{progress['batch']}/{progress.get('batches_per_epoch') or '?'}"


STATUS_STYLES = {
    JobStatus.queued: "yellow",
    JobStatus.running: "cyan",
    JobStatus.succeeded: "green",
    JobStatus.failed: "red",
    JobStatus.cancelled: "magenta",
}


def _status(status: str) -> str:
    return f"[{STATUS_STYLES.get(JobStatus(status), 'white')}]{status}[/]"


def _event_line(event: dict[str, Any]) -> str:
    level = str(event.get("level", "")).upper()
    return f"{_time(event.get('time'))} {level:<7} {event.get('kind', ''):<12} {event.get('message', '')}"


def _exit_code(job: dict[str, Any]) -> int:
    return {
        JobStatus.succeeded: EXIT_OK,
        JobStatus.failed: EXIT_FAILED,
        JobStatus.cancelled: EXIT_CANCELLED,
    }.get(JobStatus(job["status"]), EXIT_ERROR)


def _is_loss(name: str) -> bool:
    return name.startswith(BATCH_PREFIX) and "loss" in name.lower()


def _total_loss(name: str) -> bool:
    # SG names its loss components `<Loss>/loss_cls` etc. and their sum `<Loss>/loss`.
    return name.endswith("/loss") or name == BATCH_PREFIX + "loss"


# --- following a job -------------------------------------------------------------------------------


class FollowState:
    """What a followed job's messages have said so far."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.progress: dict[str, Any] = job["progress"]
        self.progress_at = time.monotonic()
        self.loss: float | None = None
        self.loss_name: str | None = None

    def apply(self, message: Message) -> None:
        if message.event == "status":
            self.job = message.data
            self.progress, self.progress_at = message.data["progress"], time.monotonic()
        elif message.event == "progress":
            self.progress, self.progress_at = message.data, time.monotonic()
        elif message.event == "metric" and _is_loss(message.data["name"]):
            name = message.data["name"]
            # The total loss once seen; a component only until then.
            if (
                self.loss_name is None
                or name == self.loss_name
                or (_total_loss(name) and not _total_loss(self.loss_name))
            ):
                self.loss_name, self.loss = name, message.data["value"]

    def eta(self) -> float | None:
        """The server's estimate, counted down since it came (progress comes once per batch)."""
        eta = self.progress.get("eta_seconds")
        if eta is None or self.job["status"] != JobStatus.running:
            return None
        return max(0.0, eta - (time.monotonic() - self.progress_at))

    @property
    def loss_text(self) -> str:
        return f"{self.loss:.4f}" if self.loss is not None else "-"

    def fields(self) -> dict[str, Any]:
        return {
            "status": self.job["status"],
            "epoch": _epoch(self.progress),
            "batch": _batch(self.progress),
            "eta": _duration(self.eta()),
            "loss": self.loss_text,
            "best": _best(self.job),
        }


class _Eta(ProgressColumn):
    def __init__(self, state: FollowState) -> None:
        super().__init__()
        self.state = state

    def render(self, task: Task) -> Text:
        return Text(f"ETA {_duration(self.state.eta())}")


class LiveView:
    """A terminal: a live progress bar (epoch, batch, ETA, loss, best metric), events above it."""

    def __init__(self, state: FollowState) -> None:
        self.state = state
        self.bar = Progress(
            TextColumn("[bold]{task.fields[status]:<9}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("epoch {task.fields[epoch]}  batch {task.fields[batch]}"),
            # The server's ETA (`progress.eta_seconds`), not rich's guess from the bar's speed,
            # ticking between messages.
            _Eta(state),
            TextColumn("loss {task.fields[loss]}  best {task.fields[best]}"),
            console=console,
            refresh_per_second=4,
        )
        self.task = self.bar.add_task(state.job["id"], total=100.0, **state.fields())

    def __enter__(self) -> LiveView:
        self.bar.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.update_bar()
        self.bar.stop()

    def update_bar(self) -> None:
        self.bar.update(self.task, completed=self.state.progress.get("percent") or 0.0, **self.state.fields())

    def show(self, message: Message) -> None:
        if message.event in ("event", "superseded"):
            self.bar.console.print(escape(_event_line(message.data)))
        self.update_bar()


class LineView:
    """Not a terminal (a log file, CI): events, and a progress line per epoch or every few seconds."""

    def __init__(self, state: FollowState) -> None:
        self.state = state
        self.printed: tuple[str, str] | None = None
        self.at = 0.0

    def __enter__(self) -> LineView:
        return self

    def __exit__(self, *_: object) -> None:
        self.line(force=True)

    def line(self, *, force: bool = False) -> None:
        f = self.state.fields()
        key = (f["status"], f["epoch"])
        if not force and key == self.printed and time.monotonic() - self.at < LINE_EVERY_SECONDS:
            return
        self.printed, self.at = key, time.monotonic()
        percent = self.state.progress.get("percent") or 0.0
        console.print(
            f"{f['status']} {percent:5.1f}%  epoch {f['epoch']}  batch {f['batch']}  ETA {f['eta']}  "
            f"loss {f['loss']}  best {f['best']}",
        )

    def show(self, message: Message) -> None:
        if message.event in ("event", "superseded"):
            console.print(escape(_event_line(message.data)))
        elif message.event in ("status", "progress"):
            self.line()


class JsonView:
    """`--json`: every message as one JSON object per line."""

    def __enter__(self) -> JsonView:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def show(self, message: Message) -> None:
        _print_json(message.as_json())


def _summary(job: dict[str, Any]) -> None:
    line = f"job {job['id']} {_status(job['status'])}: best {escape(_best(job))}"
    if job.get("error"):
        line += f"; {job['error']['reason']}: {escape(job['error']['message'])}"
    console.print(line)


def _follow(
    api: Api, job: dict[str, Any], *, as_json: bool, messages: Callable[[], Iterator[Message]] | None = None
) -> int:
    """Show the job live until it ends; its exit code (0 only when it succeeded)."""
    state = FollowState(job)
    view: LiveView | LineView | JsonView
    if as_json:
        view = JsonView()
    elif console.is_terminal:
        view = LiveView(state)
    else:
        view = LineView(state)
    feed = messages() if messages is not None else api.stream(job["id"])
    try:
        with view:
            for message in feed:
                state.apply(message)
                view.show(message)
    except KeyboardInterrupt:
        # Leaving the stream closes the connection; the job itself is not touched.
        err.print(
            f"detached from job {job['id']}: it goes on (`sgjobs logs {job['id']} -f` follows it again, "
            f"`sgjobs cancel {job['id']}` stops it)"
        )
        return EXIT_DETACHED
    if not as_json:
        _summary(state.job)
    return _exit_code(state.job)


# --- jobs ------------------------------------------------------------------------------------------


def _load_spec(path: Path) -> dict[str, Any]:
    import yaml

    text = path.read_text()
    try:
        spec = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise UsageError(
            f"{path}: not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: {exc}"
        ) from exc
    if not isinstance(spec, dict):
        raise UsageError(f"{path}: a job spec is a mapping (model, dataset, training, ...)")
    return spec


def submit(
    spec: Annotated[
        Path,
        typer.Argument(
            help="The job spec, JSON or YAML (.yaml/.yml), as POST /jobs takes it.",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ],
    follow: Follow = False,
    as_json: AsJson = False,
) -> None:
    """Submit a job; with --follow, show it live until it ends."""
    with _api() as api:
        try:
            body = _load_spec(spec)
        except UsageError as error:
            _fail(error)
        job = api.json("POST", "/jobs", json=body)
        if as_json:
            _print_json(job)
        else:
            console.print(f"submitted job [bold]{job['id']}[/] ({_status(job['status'])})")
        if follow:
            raise typer.Exit(_follow(api, job, as_json=as_json))


def ls(
    status: Annotated[JobStatus | None, typer.Option(help="Only jobs in this status.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200, help="At most this many (newest first).")] = 50,
    as_json: AsJson = False,
) -> None:
    """List jobs, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if status is not None:
        params["status"] = status.value
    with _api() as api:
        page = api.json("GET", "/jobs", params=params)
    if as_json:
        _print_json(page)
        return
    table = Table(box=None, header_style="bold")
    for column in ("ID", "NAME", "STATUS", "PROGRESS", "EPOCH", "BEST", "CREATED"):
        table.add_column(column, no_wrap=column in ("ID", "STATUS", "CREATED"))
    for job in page["items"]:
        table.add_row(
            job["id"],
            escape(job.get("name") or "-"),
            _status(job["status"]),
            f"{job['progress']['percent']:.0f}%",
            _epoch(job["progress"]),
            escape(_best(job)),
            _time(job["created_at"]),
        )
    console.print(table)
    if page["total"] > len(page["items"]):
        console.print(f"({len(page['items'])} of {page['total']}; --limit for more)")


def show(job_id: JobId, as_json: AsJson = False) -> None:
    """Show a job: status, progress, best metric, error, artifacts."""
    with _api() as api:
        job = api.json("GET", f"/jobs/{job_id}")
    if as_json:
        _print_json(job)
        return
    progress = job["progress"]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    rows: list[tuple[str, str]] = [
        ("id", job["id"]),
        ("name", escape(job.get("name") or "-")),
        ("status", _status(job["status"]) + (" (cancel requested)" if job.get("cancel_requested") else "")),
        ("model", job["model"]),
        ("dataset", escape(json.dumps({k: v for k, v in job["spec"]["dataset"].items() if v is not None}))),
        (
            "progress",
            f"{progress['percent']:.1f}%  epoch {_epoch(progress)}  batch {_batch(progress)}  "
            f"ETA {_duration(progress.get('eta_seconds'))}",
        ),
        ("best", escape(_best(job))),
        ("classes", escape(", ".join(job.get("classes") or []) or "-")),
        ("attempt", f"{job['attempt']} (restarts {job['restarts']})"),
        ("worker", escape(job.get("worker") or "-")),
        ("device", job.get("device") or "-"),
        ("created", _time(job["created_at"])),
        ("started", _time(job.get("started_at"))),
        ("finished", _time(job.get("finished_at"))),
        ("artifacts", escape(", ".join(sorted(job.get("artifacts") or {})) or "-")),
    ]
    if job.get("error"):
        rows.append(("error", f"{job['error']['reason']}: {escape(job['error']['message'])}"))
    for key, value in rows:
        grid.add_row(key, value)
    console.print(grid)


def cancel(job_id: JobId, as_json: AsJson = False) -> None:
    """Cancel a queued job, or ask a running one to stop (within one batch)."""
    with _api() as api:
        job = api.json("POST", f"/jobs/{job_id}/cancel")
    if as_json:
        _print_json(job)
    elif job["status"] == JobStatus.cancelled:
        console.print(f"job {job['id']} {_status(job['status'])}")
    else:
        console.print(
            f"job {job['id']}: cancel requested ({_status(job['status'])}; it stops within a batch)"
        )


def resume(
    job_id: JobId,
    max_epochs: Annotated[
        int | None, typer.Option(min=1, help="The new total number of epochs (default: unchanged).")
    ] = None,
    follow: Follow = False,
    as_json: AsJson = False,
) -> None:
    """Queue a cancelled or failed job again, from its last checkpoint."""
    body = {"max_epochs": max_epochs} if max_epochs is not None else {}
    with _api() as api:
        # Followed from the earlier attempts' events on, not their (possibly long) metric history;
        # the newest point read before resuming, so none of the new attempt's is skipped.
        since = f"0.{_newest_metric(api, job_id)}.0" if follow else None
        job = api.json("POST", f"/jobs/{job_id}/resume", json=body)
        if as_json:
            _print_json(job)
        else:
            console.print(f"job {job['id']} resumed ({_status(job['status'])}, attempt {job['attempt'] + 1})")
        if follow:
            raise typer.Exit(
                _follow(api, job, as_json=as_json, messages=lambda: api.stream(job["id"], since))
            )


def _events(api: Api, job_id: str) -> Iterator[dict[str, Any]]:
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 1000}
        if cursor is not None:
            params["cursor"] = cursor
        page = api.json("GET", f"/jobs/{job_id}/events", params=params)
        yield from page["items"]
        if not page["items"]:
            return
        cursor = page["next_cursor"]


def _newest_metric(api: Api, job_id: str) -> str:
    # With max_points the page's next_cursor is the newest point: a stream resumed from it skips
    # the (possibly long) metric history that `logs` does not show.
    from app.jobs.downsample import MIN_POINTS

    page = api.json("GET", f"/jobs/{job_id}/metrics", params={"max_points": MIN_POINTS})
    return page.get("next_cursor") or "0"


def logs(
    job_id: JobId,
    follow: Follow = False,
    console_log: Annotated[
        bool,
        typer.Option("--console", help="The training process's raw output (console.log) instead of events."),
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Show a job's events (state changes, warnings, errors, log lines); -f follows them.

    Like `det task logs`: the job's own log, across its attempts. --console prints the training
    process's raw output (console.log) instead."""
    if console_log and follow:
        _fail(UsageError("--console prints the console log as it is; follow the events with -f instead"))
    with _api() as api:
        if console_log:
            _print_console_log(api, job_id)
            return
        last_event = 0
        for event in _events(api, job_id):
            last_event = event["id"]
            if as_json:
                _print_json(event)
            else:
                console.print(escape(_event_line(event)))
        if not follow:
            return
        job = api.json("GET", f"/jobs/{job_id}")
        cursor = f"{last_event}.{_newest_metric(api, job_id)}.0"

        def messages() -> Iterator[Message]:
            for message in api.stream(job_id, cursor):
                # The history was printed above: the stream's opening snapshot of the job is not
                # news, and its events come after `last_event`.
                if message.event in ("event", "superseded", "status"):
                    yield message

        raise typer.Exit(_follow_events(api, job, as_json=as_json, messages=messages))


def _follow_events(
    api: Api, job: dict[str, Any], *, as_json: bool, messages: Callable[[], Iterator[Message]]
) -> int:
    final = job
    try:
        for message in messages():
            if message.event == "status":
                final = message.data
                continue
            if as_json:
                _print_json(message.data)
            else:
                console.print(escape(_event_line(message.data)))
    except KeyboardInterrupt:
        err.print(f"detached from job {job['id']}: it goes on")
        return EXIT_DETACHED
    if not as_json:
        _summary(final)
    return _exit_code(final)


def _artifact(api: Api, job_id: str, kind: str) -> dict[str, Any]:
    listing = api.json("GET", f"/jobs/{job_id}/artifacts")
    for item in listing["items"]:
        if item["kind"] == kind:
            found: dict[str, Any] = item
            return found
    raise CliError(f"job {job_id} has no {kind} file (status {listing['status']})")


def _print_console_log(api: Api, job_id: str) -> None:
    artifact = _artifact(api, job_id, "console_log")
    with api.client.stream("GET", artifact["url"]) as response:
        api.check(response)
        for chunk in response.iter_bytes(CHUNK_BYTES):
            sys.stdout.buffer.write(chunk)
    sys.stdout.flush()


def _transfer_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


def download(
    job_id: JobId,
    onnx: Annotated[
        bool, typer.Option("--onnx", help="The ONNX export (made now if it does not exist yet).")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="File or folder to write (default: <job id>-<file name> here)."),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Download a job's best checkpoint, or with --onnx its ONNX export."""
    with _api() as api:
        if onnx:
            with err.status("exporting to ONNX..."):
                export = api.json("POST", f"/jobs/{job_id}/export", timeout=EXPORT_TIMEOUT)
            artifact = export["artifact"]
        else:
            artifact = _artifact(api, job_id, "ckpt_best")
        name = f"{job_id}-{PurePosixPath(artifact['name']).name}"
        target = output if output is not None else Path(name)
        if target.is_dir():
            target = target / name
        with _transfer_bar() as bar:
            task = bar.add_task(escape(target.name), total=artifact.get("size"))
            sha256 = api.download(
                artifact["url"],
                target,
                on_start=lambda total: bar.update(task, total=total),
                on_chunk=lambda n: bar.advance(task, n),
            )
    size = target.stat().st_size
    if as_json:
        _print_json({"path": str(target), "bytes": size, "sha256": sha256, "artifact": artifact})
    else:
        console.print(f"wrote {escape(str(target))} ({size} bytes, sha256 {sha256})")


def predict(
    job_id: JobId,
    images: Annotated[
        list[Path], typer.Argument(help="Image files.", exists=True, dir_okay=False, readable=True)
    ],
    save: Annotated[
        Path | None, typer.Option(help="Write each image with its boxes drawn into this folder.")
    ] = None,
    conf: Annotated[float | None, typer.Option(min=0, max=1, help="Score threshold.")] = None,
    iou: Annotated[float | None, typer.Option(min=0, max=1, help="NMS IoU threshold.")] = None,
    as_json: AsJson = False,
) -> None:
    """Detect objects in images with a job's best model; prints the detections."""
    form: dict[str, str] = {"job_id": job_id}
    if conf is not None:
        form["conf"] = str(conf)
    if iou is not None:
        form["iou"] = str(iou)
    with _api() as api:
        files = [("files", (path.name, path.read_bytes())) for path in images]
        result = api.json("POST", "/predict", data=form, files=files)
        saved: list[Path] = []
        if save is not None:
            save.mkdir(parents=True, exist_ok=True)
            for path in images:
                # The service draws the boxes (format=image), as the dashboard shows them.
                image_format = "png" if path.suffix.lower() == ".png" else "jpeg"
                rendered = api.request(
                    "POST",
                    "/predict",
                    data={**form, "format": "image", "image_format": image_format},
                    files=[("files", (path.name, path.read_bytes()))],
                )
                target = save / f"{path.stem}.{'png' if image_format == 'png' else 'jpg'}"
                target.write_bytes(rendered.content)
                saved.append(target)
    if as_json:
        _print_json(result)
        return
    table = Table(box=None, header_style="bold")
    for column in ("IMAGE", "CLASS", "SCORE", "BOX (x1, y1, x2, y2)"):
        table.add_column(column)
    for image in result["images"]:
        if not image["detections"]:
            table.add_row(escape(image["file"]), "-", "-", "no detections")
        for detection in image["detections"]:
            box = ", ".join(f"{v:.0f}" for v in detection["box"])
            table.add_row(
                escape(image["file"]), escape(detection["class_name"]), f"{detection['score']:.3f}", box
            )
    console.print(table)
    for path in saved:
        console.print(f"saved {escape(str(path))}")


# --- datasets --------------------------------------------------------------------------------------

datasets = typer.Typer(help="Datasets: upload.", no_args_is_help=True)


def _archive_folder(folder: Path, target: Path) -> None:
    """Zip the files under `folder` into `target` (on disk: a large dataset never sits in memory)."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    with (
        Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), console=err) as bar,
        zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive,
    ):
        task = bar.add_task(f"archiving {escape(folder.name)}", total=len(paths))
        for path in paths:
            stored = path.suffix.lower() in STORED_SUFFIXES
            archive.write(
                path,
                path.relative_to(folder).as_posix(),
                compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED,
            )
            bar.advance(task)


def _chunks(path: Path, on_chunk: Callable[[int], None]) -> Iterator[bytes]:
    with path.open("rb") as source:
        while chunk := source.read(CHUNK_BYTES):
            on_chunk(len(chunk))
            yield chunk


def _archive_name(path: Path) -> str:
    name = path.name
    for suffix in (".zip", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz", ".tar"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def _upload(api: Api, archive: Path, name: str) -> dict[str, Any]:
    size = archive.stat().st_size
    with _transfer_bar() as bar:
        task = bar.add_task(f"uploading {escape(name)}", total=size)
        response = api.request(
            "POST",
            "/datasets",
            params={"name": name},
            # The raw body (the API's alternative to a multipart form), streamed from the file.
            content=_chunks(archive, lambda n: bar.advance(task, n)),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )
    data: dict[str, Any] = response.json()
    return data


@datasets.command("upload")
def datasets_upload(
    path: Annotated[
        Path,
        typer.Argument(
            help="A zip or tar(.gz/.bz2/.xz) archive, or a folder (zipped on the fly).", exists=True
        ),
    ],
    name: Annotated[
        str | None, typer.Option(help="The dataset's name (default: the file's or folder's).")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Upload a dataset (COCO, YOLO or Hugging Face layout); the service validates it."""
    name = name or _archive_name(path.resolve())
    with _api() as api:
        if path.is_dir():
            with tempfile.TemporaryDirectory(prefix="sgjobs-upload-") as scratch:
                archive = Path(scratch) / f"{name}.zip"
                _archive_folder(path, archive)
                dataset = _upload(api, archive, name)
        else:
            dataset = _upload(api, path, name)
    if as_json:
        _print_json(dataset)
    else:
        classes = dataset.get("classes") or []
        console.print(
            f"dataset [bold]{dataset['id']}[/] {escape(dataset['name'])!r}: {dataset['status']}, "
            f"{dataset['format']}, {dataset['file_count']} files, {len(classes)} classes "
            f"({escape(', '.join(classes))})",
        )
        for problem in (dataset.get("report") or {}).get("problems", []):
            err.print(f"  {problem['severity']}: {escape(problem['file'])}: {escape(problem['problem'])}")
        if dataset["status"] == "ready":
            console.print(f'use it in a job spec as "dataset": {{"id": "{dataset["id"]}"}}')
    if dataset["status"] != "ready":
        raise typer.Exit(EXIT_ERROR)


def register(cli: typer.Typer) -> None:
    """Add the client commands to the `sgjobs` command."""
    panel = "Client (over HTTP: SGJOBS_URL, SGJOBS_API_KEY)"
    for name, function in (
        ("submit", submit),
        ("ls", ls),
        ("show", show),
        ("logs", logs),
        ("cancel", cancel),
        ("resume", resume),
        ("predict", predict),
        ("download", download),
    ):
        cli.command(name, rich_help_panel=panel, epilog=EXIT_CODES_HELP)(function)
    cli.add_typer(datasets, name="datasets", rich_help_panel=panel)
