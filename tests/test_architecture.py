"""The API starts fast and clean: no torch or super-gradients in the API or the worker's main process."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "module", ["app.main", "app.cli", "worker.celery_app", "worker.tasks", "worker.train_process"]
)
def test_module_does_not_import_torch_or_super_gradients(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "heavy = ('torch', 'super_gradients', 'torchvision')\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()[:200]}"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_app_never_imports_worker() -> None:
    offenders = [
        str(p) for p in (ROOT / "app").rglob("*.py") if any(n.split(".")[0] == "worker" for n in _imports(p))
    ]
    assert offenders == []


def test_torch_and_super_gradients_are_imported_only_in_app_ml() -> None:
    offenders = []
    for path in [*(ROOT / "app").rglob("*.py"), *(ROOT / "worker").rglob("*.py")]:
        if (ROOT / "app" / "ml") in path.parents:
            continue
        if any(n.split(".")[0] in ("torch", "super_gradients", "torchvision") for n in _imports(path)):
            offenders.append(str(path))
    assert offenders == []


def _app_modules(package: str) -> list[Path]:
    return list((ROOT / "app" / package).rglob("*.py"))


def test_datasets_never_imports_jobs() -> None:
    # jobs may use datasets (a job names its dataset), never the reverse: no cycle between areas.
    offenders = [
        str(p)
        for p in _app_modules("datasets")
        if any(n == "app.jobs" or n.startswith("app.jobs.") for n in _imports(p))
    ]
    assert offenders == []


def test_weights_never_imports_jobs_or_the_areas_that_use_it() -> None:
    # jobs may use weights (a job starts from them), never the reverse; prediction and artifacts use jobs.
    areas = ("app.jobs", "app.prediction", "app.artifacts")
    offenders = [
        f"{p}: {n}"
        for p in _app_modules("weights")
        for n in _imports(p)
        if any(n == a or n.startswith(a + ".") for a in areas)
    ]
    assert offenders == []


def test_the_ml_backend_imports_no_area_of_the_service() -> None:
    # app/ml is the super-gradients backend: it gets plain data in and reports through a protocol.
    areas = (
        "app.jobs",
        "app.datasets",
        "app.weights",
        "app.prediction",
        "app.artifacts",
        "app.health",
        "app.main",
    )
    offenders = [
        f"{p}: {n}"
        for p in _app_modules("ml")
        for n in _imports(p)
        if any(n == a or n.startswith(a + ".") for a in areas)
    ]
    assert offenders == []


# What the client CLI may not load: it runs on a laptop against a remote service, over HTTP only.
SERVER_ONLY = (
    "torch",
    "super_gradients",
    "torchvision",
    "sqlalchemy",
    "celery",
    "kombu",
    "fastapi",
    "psycopg",
)
CLIENT_MODULES = ("app/cli/client.py", "app/cli/http.py")


@pytest.mark.parametrize("module", ["app.cli", "app.cli.client"])
def test_the_cli_loads_no_database_broker_api_or_training_code(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        f"heavy = {SERVER_ONLY!r}\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()[:200]}"


def test_the_client_cli_imports_no_server_code() -> None:
    # Not even lazily: the client's modules name no database, service, router or broker module.
    server = ("app.db", "app.queue", "app.main", "app.api", "app.migrate", "app.auth", "app.testing")
    offenders = [
        f"{name}: {n}"
        for name in CLIENT_MODULES
        for n in _imports(ROOT / name)
        if n.split(".")[0] in SERVER_ONLY
        or any(n == s or n.startswith(s + ".") for s in server)
        or n.rsplit(".", 1)[-1] in ("models", "service", "router")
    ]
    assert offenders == []
