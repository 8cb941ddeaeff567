"""A property-based fuzz of the whole API from its own schema: schemathesis, every check, both backends.

`schemathesis run` reads the running service's /openapi.json and runs all its phases on every
operation (schema examples; the coverage phase's boundary values, malformed requests and undeclared
methods; `MAX_EXAMPLES` generated positive and negative cases per operation; stateful sequences
where it can link operations) with every built-in check on every answer. The run is reproducible:
derandomized, one worker, no example database and no crash cache carried between runs.

It runs as the CLI in a child process: schemathesis' pytest loader for a schema that only exists
once a fixture has started the service (`schemathesis.pytest.from_fixture`) does not work with the
pinned pytest 9.2 (it sets `Function._nodeid`, which pytest 9.2 no longer has). The CLI is the same
engine, and its report names each failing operation and check with a curl command that reproduces
it; the JSON report and a pytest file replaying the failures are kept under the test's tmp_path.

Path parameters get real ids half of the time (a trained job, a job cancelled before it ran, a
registered dataset, registered weights), so the fuzz reaches real objects and not only 404s. It
cannot keep the worker busy: a job spec must name an existing dataset folder or a registered
dataset, which generated specs do not (they get 422); the test checks that no generated spec was
accepted (and cancels any). Neither can it resume one: the real jobs are a succeeded one and one with
no checkpoint (409). DELETE /jobs/{job_id} gets jobs of its own to delete, never the trained job that
other tests share, and neither it nor resume is a target of the stateful phase, whose links would
hand them any job a list returns.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from app.datasets.demo import ShapesSpec, write_shapes_dataset
from tests.prediction.helpers import DATASET, trained_job
from tests.support import TERMINAL, Service, tiny_spec, zip_folder

pytestmark = pytest.mark.slow  # 2-3 minutes per backend on 2 CPU cores (plus a training if none ran)

# Generated cases per operation in the fuzzing phase (positive and negative); the coverage phase's
# cases come on top. With 100 the whole schema took 6-6.5 minutes per backend in a loaded suite run
# (2 CPU cores), the two slowest tests of the suite; 50 keeps it near 2-3 minutes.
MAX_EXAMPLES = 50
RUN_TIMEOUT = 600

# schemathesis.toml. `$name` placeholders are filled in by the test.
CONFIG = string.Template(
    """
color = false

[generation]
max-examples = $max_examples
# Reproducible: derandomized (the same cases on every run of the same schema), and no example
# database, which would replay an earlier run's failures and make CI depend on a machine's history.
deterministic = true
database = "none"

# Likewise: no crash cache (schemathesis replays cached failures first by default).
[cache]
enabled = false

# Every check is on (the default). Two of them decide what a request "should" get:
#
# - negative_data_rejection: a request that violates the schema must be refused. Its default list
#   (kept here explicitly) counts 400, 404, 405, 406, 409, 415, 422, 428, 429 (and 401/403/5xx) as a
#   refusal, so a semantic refusal (404 for an unknown id, 409) of an invalid request is fine; what it
#   catches is a 2xx for invalid data.
# - positive_data_acceptance: a request that satisfies the schema must be accepted. Its default list
#   (kept here explicitly: setting it replaces the default, it does not extend it) also allows 404 (an
#   id that does not exist), 409 (a conflict with the object's state), 401/403/429 and 5xx (5xx is
#   `not_a_server_error`'s to report). It does not allow 422: a valid request refused as invalid
#   usually means the schema is looser than the validation. The schemathesis docs add 422 per
#   operation where the API has rules JSON Schema cannot state; the [[operations]] below do that, and
#   only for those operations.
[checks]
negative_data_rejection.expected-statuses = [
  "400", "401", "403", "404", "405", "406", "409", "415", "422", "428", "429", "5xx",
]
positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]

# Every valid set of export options other than one seen before is a new ONNX export (seconds to half a
# minute each, up to 2048 px): fewer generated cases for the two export operations keep the run near
# its 2 minutes per backend (the coverage phase still sends their boundary values).
# `fp16` needs a server with a CUDA GPU: on this CPU-only one a valid `fp16: true` is a 422.
[[operations]]
include-name = "POST /jobs/{job_id}/export"
generation.max-examples = 8
checks.positive_data_acceptance.expected-statuses = [
  "2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx",
]

[[operations]]
include-name = "POST /weights/{weights_id}/export"
generation.max-examples = 8
checks.positive_data_acceptance.expected-statuses = [
  "2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx",
]

# A job spec must name a dataset folder that exists in the datasets directory (or a registered
# dataset), and its options must fit that dataset's format.
[[operations]]
include-name = "POST /jobs"
checks.positive_data_acceptance.expected-statuses = [
  "2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx",
]

# The body must be a zip or tar archive of a dataset in a layout the server knows; any other bytes
# are a valid `format: binary` body. A multipart upload (here and to POST /weights) of more than
# UPLOAD_MAX_PARTS (16) parts, or with a field over MULTIPART_MAX_FIELD_BYTES, is refused as 413, the
# status of every size limit here (as for POST /predict below): seen in the stateful phase, a form
# whose `name` became an array of more than 16 fields.
[[operations]]
include-name = "POST /datasets"
checks.positive_data_acceptance.expected-statuses = [
  "2xx", "3xx", "401", "403", "404", "409", "413", "422", "429", "5xx",
]
checks.negative_data_rejection.expected-statuses = [
  "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx",
]

# The file must be a YOLO-NAS checkpoint (any other bytes are a valid `format: binary` part), and a
# promoted job must exist.
[[operations]]
include-name = "POST /weights"
checks.positive_data_acceptance.expected-statuses = [
  "2xx", "3xx", "401", "403", "404", "409", "413", "422", "429", "5xx",
]
checks.negative_data_rejection.expected-statuses = [
  "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx",
]

# The files must be images the server can decode (415 for another media type, 422 for a broken or
# oversized image); any other bytes are valid `format: binary` parts. More files than the document's
# `maxItems` (the server's predict_max_images) is a schema violation the server refuses as 413, the
# status of every size limit here: a refusal like the default list's. The schema lets a form carry
# fields it does not name, and every form field other than a file is capped at
# MULTIPART_MAX_FIELD_BYTES (1 KiB, a limit JSON Schema cannot put on fields it does not name): a
# valid request with a longer one is refused as 413 too (seen in CI's stateful phase).
[[operations]]
include-name = "POST /predict"
checks.positive_data_acceptance.expected-statuses = [
  "2xx", "3xx", "401", "403", "404", "409", "413", "415", "422", "429", "5xx",
]
checks.negative_data_rejection.expected-statuses = [
  "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx",
]
# The stateful phase (schemathesis 4.32) judged a valid /predict request as negative data: one PNG,
# iou=0.0, a real job id put into the body by a link, and the case's own description "positive test
# case" (seen in CI, not reproducible on demand). The fuzzing and coverage phases check /predict's
# refusals of invalid data; the stateful phase keeps every other check on it.
phases.stateful.checks.negative_data_rejection.enabled = false

# `bbox_format` applies to Hugging Face datasets only: a valid value for a dataset of another format
# is refused.
[[operations]]
include-name = "POST /datasets/{dataset_id}/validate"
checks.positive_data_acceptance.expected-statuses = [
  "2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx",
]

# Resume and delete act on whatever job they are given, and schemathesis hands an operation ids it
# saw in other operations' answers: the stateful phase's links, and in every other phase values
# harvested from responses ("extra data sources"), which would be any job of the test session (the
# shared trained one, other tests' jobs with checkpoints). Both get only the ids bound below.
# max_epochs must be at least the job's current one.
[[operations]]
include-name = "POST /jobs/{job_id}/resume"
checks.positive_data_acceptance.expected-statuses = [
  "2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx",
]
phases.stateful.enabled = false
phases.examples.extra-data-sources.responses = false
phases.coverage.extra-data-sources.responses = false
phases.fuzzing.extra-data-sources.responses = false

# A stream ends once its job has finished (or after the server's stream_max_seconds, an hour). Like
# resume and delete it gets only the ids bound below (finished jobs: each stream sends the job's
# history and ends) or generated ones (404), never a queued or running job harvested from an answer,
# whose stream would run until the request timeout. The coverage phase counts a case as positive
# when only its path parameter was made "near-boundary" while its Last-Event-ID header was made
# invalid (the case's components say `header: negative`), so a 422 on the header is allowed here.
[[operations]]
include-name = "GET /jobs/{job_id}/stream"
checks.positive_data_acceptance.expected-statuses = [
  "2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx",
]
phases.stateful.enabled = false
phases.examples.extra-data-sources.responses = false
phases.coverage.extra-data-sources.responses = false
phases.fuzzing.extra-data-sources.responses = false

# Deletes only the jobs made for it (the first delete of each is a 204, later ones 404).
[[operations]]
include-name = "DELETE /jobs/{job_id}"
parameters."path.job_id" = { dictionary = "deletable_jobs", probability = 0.5 }
phases.stateful.enabled = false
phases.examples.extra-data-sources.responses = false
phases.coverage.extra-data-sources.responses = false
phases.fuzzing.extra-data-sources.responses = false

# Real ids for half of the path parameters (the docs' answer to "missing test data"): the rest stay
# generated, so unknown ids are fuzzed too. Path parameters only: a bound body field is also put into
# negative cases by the stateful phase (a false "schema-violating request accepted"), and a body field
# that could name a dataset must never be bound (a generated job spec must not start a training).
[dictionaries.jobs]
values = $jobs

[dictionaries.deletable_jobs]
values = $deletable_jobs

[dictionaries.datasets]
values = $datasets

[dictionaries.weights]
values = $weights

[parameters]
"path.job_id" = { dictionary = "jobs", probability = 0.5 }
"path.dataset_id" = { dictionary = "datasets", probability = 0.5 }
"path.weights_id" = { dictionary = "weights", probability = 0.5 }
"""
)


def _cancelled_job(service: Service, name: str) -> str:
    job_id: str = service.submit(tiny_spec(DATASET, name=name))["id"]
    service.client.post(f"/jobs/{job_id}/cancel")
    service.wait(job_id, timeout=300)
    return job_id


# `python -m schemathesis.cli`, with one guard. Hypothesis 6.170's hill climbing (the `target` phase,
# which schemathesis always runs to raise each operation's success rate) can index past the end of
# a test case it has just replaced with a shorter one (IndexError in `Optimiser.hill_climb`), and
# schemathesis reports that as an error of the operation. The phase only steers generation, so a
# climb that fails that way is ended instead; every case it ran was checked as usual.
RUN_CLI = """
from hypothesis.internal.conjecture import optimiser

hill_climb = optimiser.Optimiser.hill_climb


def guarded_hill_climb(self):
    try:
        hill_climb(self)
    except IndexError:
        pass


optimiser.Optimiser.hill_climb = guarded_hill_climb

import schemathesis.cli

schemathesis.cli.schemathesis()
"""


def _real_objects(service: Service, tmp_path: Path) -> tuple[list[str], list[str], list[str], list[str]]:
    """A trained job (shared with the other tests), a job cancelled before it ran, a registered
    dataset, the trained job's checkpoint registered as weights, and two finished jobs to delete."""
    trained = trained_job(service)["id"]
    cancelled = _cancelled_job(service, "fuzz-cancelled")
    deletable = [_cancelled_job(service, f"fuzz-deletable-{i}") for i in range(2)]
    root = write_shapes_dataset(tmp_path / "fuzz-shapes", ShapesSpec(splits=(("train", 4), ("valid", 2))))
    response = service.client.post(
        "/datasets", files={"file": ("fuzz.zip", zip_folder(root), "application/zip")}, data={"name": "fuzz"}
    )
    assert response.status_code == 201, response.text
    weights = service.client.post("/weights", json={"from_job": trained}, timeout=300)
    assert weights.status_code in (200, 201), weights.text
    return [trained, cancelled], [response.json()["id"]], [weights.json()["id"]], deletable


def _summary(report_dir: Path) -> str:
    """The failures from the JSON report, one line per kind with its operations."""
    reports = sorted(report_dir.glob("*.json"))
    if not reports:
        return "(no JSON report)"
    report: dict[str, Any] = json.loads(reports[-1].read_text())
    lines = [
        f"{f['code']} {f['title']} ({f['count']}): {', '.join(f['operations'])}" for f in report["failures"]
    ]
    lines += [f"error: {e}" for e in report.get("errors", [])]
    return "\n".join(lines)


def test_fuzz_the_whole_schema(service: Service, tmp_path: Path) -> None:
    jobs, datasets, weights, deletable = _real_objects(service, tmp_path)
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        CONFIG.substitute(
            max_examples=MAX_EXAMPLES,
            jobs=json.dumps(jobs),
            deletable_jobs=json.dumps(deletable),
            datasets=json.dumps(datasets),
            weights=json.dumps(weights),
        )
    )
    before = {j["id"] for j in service.client.get("/jobs", params={"limit": 200}).json()["items"]}
    report_dir = tmp_path / "report"
    cmd = [sys.executable, "-c", RUN_CLI, "--config-file", str(config), "run"]
    cmd += [f"{service.base_url}/openapi.json", "--workers", "1", "--request-timeout", "120"]
    # Authenticated as the admin: every operation is reachable (the 401 answers are tests/auth's).
    cmd += ["--header", f"Authorization: Bearer {service.admin_key}"]
    cmd += ["--report", "json,pytest", "--report-dir", str(report_dir)]
    started = time.monotonic()
    done = subprocess.run(
        cmd,
        cwd=tmp_path,  # where Hypothesis and schemathesis keep their working files
        env={**os.environ, "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    seconds = time.monotonic() - started
    print(f"schemathesis ({service.backend}): exit {done.returncode} in {seconds:.0f} s")

    # No generated job spec may have been accepted (it would have queued a training).
    after = service.client.get("/jobs", params={"limit": 200}).json()["items"]
    created = [j for j in after if j["id"] not in before]
    for job in created:
        if job["status"] not in TERMINAL:
            service.client.post(f"/jobs/{job['id']}/cancel")
    assert not created, f"the fuzz created jobs (cancelled now): {[j['spec'] for j in created]}"
    # The jobs other tests share are still there, as they were.
    for job_id in jobs:
        assert service.job(job_id)["status"] in TERMINAL
    assert service.job(jobs[0])["status"] == "succeeded"

    if done.returncode != 0:
        output = done.stdout + done.stderr
        start = output.find("FAILURES")
        details = output[output.rfind("\n", 0, start) + 1 :] if start >= 0 else output
        pytest.fail(
            f"schemathesis found failures ({service.backend}, exit {done.returncode}, {seconds:.0f} s):\n"
            f"{_summary(report_dir)}\n\nReports (JSON, and a pytest file replaying each failure): "
            f"{report_dir}\n\n{details[-30000:]}",
            pytrace=False,
        )
