"""The client commands of `sgjobs` (`python -m app.cli`, a real subprocess) against a real
`sgjobs serve`, through HTTP only: one tiny training per backend (uploaded and followed by the CLI)
serves the tests that need a trained job."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import update

from app.cli import client
from app.cli.client import EXIT_CANCELLED, EXIT_DETACHED
from app.cli.http import Api, Config
from app.db import session_scope
from app.jobs.models import Job
from app.settings import Settings
from tests.support import Service, insert_job, load_annotations, make_shapes, tiny_spec

# The client speaks HTTP only: what the backend does behind each route is tested on both backends
# where the route is; here one backend (and one training) is enough.
pytestmark = pytest.mark.backends("sqlite")

REPO = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _env(service: Service, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGJOBS_")}
    env.update(SGJOBS_URL=service.base_url, SGJOBS_API_KEY=service.admin_key, COLUMNS="200")
    env.update(extra)
    return env


# `python -m app.cli ARGS...` with SIGINT handled and unblocked, whatever the parent left it as.
_AS_IN_A_TERMINAL = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
    "from app.cli import main; sys.exit(main(sys.argv[1:]))"
)


def _signal_state(pid: int) -> str:
    """A process's blocked, ignored and caught signals (/proc), for a failure's message."""
    with open(f"/proc/{pid}/status") as status:
        return "".join(line for line in status if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def sgjobs(
    service: Service, *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """The `sgjobs` command as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env or _env(service),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@dataclass
class Trained:
    job_id: str
    dataset_id: str
    folder: Path
    followed: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def trained(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A folder uploaded with `datasets upload`, and a tiny job on it submitted (YAML) and followed
    with `submit --follow` in a terminal (rich's live view)."""
    root = tmp_path_factory.mktemp("cli")
    folder = make_shapes(root, "cli-shapes", splits=(("train", 8), ("valid", 4)))
    dataset = _json(sgjobs(service, "datasets", "upload", str(folder), "--json"))
    spec = tiny_spec("unused")
    spec["dataset"] = {"id": dataset["id"]}
    spec_file = root / "spec.yaml"
    spec_file.write_text(
        "\n".join(
            [
                f"name: {spec['name']}",
                f"model: {spec['model']}",
                f"dataset: {json.dumps(spec['dataset'])}",
                f"input_size: {json.dumps(spec['input_size'])}",
                f"training: {json.dumps(spec['training'])}",
            ]
        )
    )
    followed = sgjobs(service, "submit", str(spec_file), "--follow", env=_env(service, TTY_COMPATIBLE="1"))
    match = re.search(r"submitted job (\S+)", ANSI.sub("", followed.stdout))
    assert match, followed.stdout + followed.stderr
    return Trained(match.group(1), dataset["id"], folder, followed)


def test_upload_a_folder(service: Service, trained: Trained) -> None:
    dataset = service.client.get(f"/datasets/{trained.dataset_id}").json()
    assert dataset["status"] == "ready", dataset
    assert dataset["name"] == "cli-shapes"
    assert dataset["file_count"] == len([p for p in trained.folder.rglob("*") if p.is_file()])
    names = {c["name"] for c in load_annotations(trained.folder)["categories"]}
    assert dataset["classes"] and set(dataset["classes"]) <= names


def test_submit_follow_shows_the_training_and_exits_0(service: Service, trained: Trained) -> None:
    followed = trained.followed
    assert followed.returncode == 0, followed.stdout + followed.stderr
    out = ANSI.sub("", followed.stdout)
    job = service.job(trained.job_id)
    assert job["status"] == "succeeded"
    # The live bar's last frame: epoch, batch, loss and the best metric as the job ended.
    assert "epoch 1/1" in out
    batches = job["progress"]["batches_per_epoch"]
    assert f"batch {batches}/{batches}" in out
    assert re.search(r"loss \d+\.\d{4}", out), out
    assert f"best {job['best_metric']['name']} {job['best_metric']['value']:.4f}" in out
    assert f"job {trained.job_id} succeeded" in out
    # Events above the bar.
    assert "succeeded" in out and "INFO" in out


def test_ls_and_show_json(service: Service, trained: Trained) -> None:
    page = _json(sgjobs(service, "ls", "--status", "succeeded", "--json"))
    assert trained.job_id in [job["id"] for job in page["items"]]
    shown = _json(sgjobs(service, "show", trained.job_id, "--json"))
    assert shown == service.job(trained.job_id)


def test_ls_and_show_for_people(service: Service, trained: Trained) -> None:
    listed = sgjobs(service, "ls")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if trained.job_id in line)
    assert "succeeded" in row and "100%" in row
    shown = sgjobs(service, "show", trained.job_id)
    assert shown.returncode == 0, shown.stderr
    assert "succeeded" in shown.stdout and "ckpt_best" in shown.stdout


def test_logs_prints_the_events_and_follows_a_finished_job(service: Service, trained: Trained) -> None:
    events = service.events(trained.job_id)
    done = sgjobs(service, "logs", trained.job_id)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(events)
    assert all(event["message"] in line for event, line in zip(events, lines, strict=True))
    as_json = sgjobs(service, "logs", trained.job_id, "--json")
    assert [json.loads(line) for line in as_json.stdout.splitlines()] == events
    # Following a finished job prints its history and its end, then exits with its status's code.
    followed = sgjobs(service, "logs", trained.job_id, "-f")
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout.splitlines()[: len(events)] == lines
    assert f"job {trained.job_id} succeeded" in followed.stdout
    console = sgjobs(service, "logs", trained.job_id, "--console")
    assert console.returncode == 0, console.stderr
    log = service.client.get(f"/jobs/{trained.job_id}/artifacts/console.log").text
    # Read as text, the output's line endings are universal newlines (tqdm writes \r).
    assert console.stdout == log.replace("\r\n", "\n").replace("\r", "\n")


def test_download_the_best_checkpoint(service: Service, trained: Trained, tmp_path: Path) -> None:
    done = _json(sgjobs(service, "download", trained.job_id, "-o", str(tmp_path), "--json"))
    path = Path(done["path"])
    assert path.parent == tmp_path and path.name == f"{trained.job_id}-ckpt_best.pth"
    digest = hashlib.sha256()
    with service.client.stream("GET", done["artifact"]["url"]) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            digest.update(chunk)
    assert done["sha256"] == digest.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert done["bytes"] == path.stat().st_size == done["artifact"]["size"]
    assert done["artifact"]["kind"] == "ckpt_best"
    assert not list(tmp_path.glob("*.part"))


def test_download_the_onnx_export(service: Service, trained: Trained, tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    done = _json(sgjobs(service, "download", trained.job_id, "--onnx", "-o", str(target), "--json"))
    assert done["path"] == str(target) and done["artifact"]["kind"] == "onnx"
    served = service.client.get(done["artifact"]["url"]).content
    assert target.read_bytes() == served
    assert done["sha256"] == hashlib.sha256(served).hexdigest()


def test_the_plain_view_of_a_followed_job(
    service: Service, trained: Trained, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Not a terminal (CI logs): progress lines instead of a live bar. The finished job's whole
    # stream (history, then its terminal status) through the real service, in this process.
    monkeypatch.setattr(client, "LINE_EVERY_SECONDS", 0.0)
    job = service.job(trained.job_id)
    with Api(Config(service.base_url, service.admin_key)) as api:
        code = client._follow(api, job, as_json=False)
    out = capsys.readouterr().out
    assert code == 0
    last = [line for line in out.splitlines() if line.startswith("succeeded")][-1]
    assert "100.0%" in last and "epoch 1/1" in last and re.search(r"loss \d+\.\d{4}", last)
    assert f"job {trained.job_id} succeeded" in out


def test_predict_prints_detections_and_saves_drawn_images(
    service: Service, trained: Trained, tmp_path: Path
) -> None:
    images = sorted((trained.folder / "valid").glob("*.jpg"))[:2]
    result = _json(sgjobs(service, "predict", trained.job_id, *map(str, images), "--conf", "0.01", "--json"))
    assert [image["file"] for image in result["images"]] == [p.name for p in images]
    saved = tmp_path / "drawn"
    done = sgjobs(service, "predict", trained.job_id, *map(str, images), "--save", str(saved))
    assert done.returncode == 0, done.stderr
    for path in images:
        assert path.name in done.stdout
        drawn = saved / f"{path.stem}.jpg"
        with Image.open(drawn) as out, Image.open(path) as original:
            assert out.format == "JPEG" and out.size == original.size


def test_cancel_a_queued_job_and_an_api_error(service: Service, service_settings: Settings) -> None:
    make_shapes(service.datasets_dir, "cli-queued", splits=(("train", 2), ("valid", 1)))
    job_id = insert_job(service_settings, "cli-queued")
    done = sgjobs(service, "cancel", job_id)
    assert done.returncode == 0, done.stderr
    assert f"job {job_id} cancelled" in done.stdout
    assert service.job(job_id)["status"] == "cancelled"
    # It never trained: the API refuses to resume it (409), and the CLI says why, on stderr, with 1.
    refused = sgjobs(service, "resume", job_id)
    assert refused.returncode == 1
    assert "has no checkpoint to resume from" in refused.stderr and "HTTP 409" in refused.stderr
    assert refused.stdout == ""
    # Field errors are listed.
    invalid = sgjobs(service, "resume", job_id, "--max-epochs", "100000")
    assert invalid.returncode == 1
    assert "max_epochs" in invalid.stderr, invalid.stderr


def test_resume_follow_detach_then_cancel(
    service: Service, service_settings: Settings, trained: Trained
) -> None:
    # A cancelled job with a checkpoint: a copy of the trained job's files (checkpoints linked:
    # the training replaces them, never writes into them).
    spec = tiny_spec("unused")
    spec["dataset"] = {"id": trained.dataset_id}
    job_id = insert_job(service_settings, "unused", spec=spec, status="cancelled")
    source = Path(service.job(trained.job_id)["job_dir"])
    target = source.parent / job_id

    def link_checkpoints(src: str, dst: str) -> None:
        if src.endswith(".pth"):
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_checkpoints)
    with session_scope(service_settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(job_dir=str(target)))

    # Followed with --json: the answer, then one message per line; Ctrl-C after the first message.
    # Epochs enough that it cannot end before the Ctrl-C; the cancel below stops it within a batch.
    # The follower starts with SIGINT as a terminal gives it: started from a pytest-xdist worker
    # after other tests, it twice ignored the Ctrl-C in CI (once it ran on until the job ended and
    # exited 0, once it was still following 60 s later), which a user's `sgjobs` never sees.
    follower = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _AS_IN_A_TERMINAL,
            "resume",
            job_id,
            "--max-epochs",
            "100",
            "--follow",
            "--json",
        ],
        env=_env(service),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        resumed = json.loads(follower.stdout.readline())
        assert resumed["id"] == job_id and resumed["status"] == "queued"
        first = json.loads(follower.stdout.readline())
        assert first["event"] == "progress" and first["id"] and "max_epochs" in first["data"]
        signals = _signal_state(follower.pid)
        follower.send_signal(signal.SIGINT)
        _, stderr = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == EXIT_DETACHED, f"{stderr}\n{signals}"
    assert "detached" in stderr
    # Detaching did not cancel it.
    job = service.job(job_id)
    assert job["status"] in ("queued", "running") and not job["cancel_requested"]

    assert sgjobs(service, "cancel", job_id).returncode == 0
    followed = sgjobs(service, "logs", job_id, "-f")
    assert followed.returncode == EXIT_CANCELLED, followed.stdout + followed.stderr
    assert f"job {job_id} cancelled" in followed.stdout
    assert service.job(job_id)["status"] == "cancelled"


def test_a_bad_key_and_no_service_are_said_clearly(service: Service) -> None:
    bad = sgjobs(service, "ls", env=_env(service, SGJOBS_API_KEY="sgj_" + "x" * 43))
    assert bad.returncode == 1
    assert "HTTP 401" in bad.stderr and "SGJOBS_API_KEY" in bad.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    down = sgjobs(service, "ls", env=_env(service, SGJOBS_URL=url))
    assert down.returncode == 1
    assert f"cannot connect to the sgjobs service at {url}" in down.stderr


def test_defaults_are_the_local_service_and_its_admin_key(service: Service) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGJOBS_")}
    env.update(SGJOBS_HOME=str(service.home), SGJOBS_PORT=service.base_url.rsplit(":", 1)[1])
    page = _json(sgjobs(service, "ls", "--json", env=env))
    assert page["total"] >= 1


def test_usage_errors_exit_2(service: Service, tmp_path: Path) -> None:
    assert sgjobs(service, "show").returncode == 2
    spec = tmp_path / "spec.json"
    spec.write_text("{not json")
    done = sgjobs(service, "submit", str(spec))
    assert done.returncode == 2 and "not valid JSON" in done.stderr
