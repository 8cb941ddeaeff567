"""The dashboard at `/`, driven in Debian's Chromium by Playwright against a real `sgjobs serve`.

One real training (30 epochs at 64 px, so it is still running while the page watches): the page
takes the admin key, lists the job, charts its points live from the stream, cancels it, and draws
the boxes /predict returns for an uploaded image (the cancelled job's best checkpoint predicts),
resumes it and cancels it again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from app.dashboard.router import SECURITY_HEADERS
from tests.prediction.helpers import encode, scene
from tests.support import Service, make_shapes, tiny_spec

pytestmark = [pytest.mark.backends("sqlite")]

CHROMIUM = "/usr/bin/chromium"
DATASET = "dashboard-shapes"
# Vertices of every series' polyline in the job page's charts.
CHART_POINTS = (
    "() => [...document.querySelectorAll('#job-view svg.chart polyline')]"
    ".reduce((n, line) => n + line.points.numberOfItems, 0)"
)

QUALITY_POINTS = CHART_POINTS.replace("#job-view svg.chart", "#chart-quality")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "the browser tests need Debian's Chromium: apt-get install chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-background-networking", "--disable-gpu"],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(60_000)
    problems: list[str] = []
    # CSP violations and script errors show up here; the page must have none.
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    yield page
    context.close()
    assert not problems, problems


def test_the_page_loads_without_a_key_and_is_not_part_of_the_api(service: Service) -> None:
    with httpx.Client(base_url=service.base_url, timeout=30) as anonymous:
        page = anonymous.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        for name, value in SECURITY_HEADERS.items():
            assert page.headers[name] == value
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        script = anonymous.get("/dashboard/app.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        assert script.headers["x-content-type-options"] == "nosniff"
        assert anonymous.get("/dashboard/index.html").status_code == 404
        assert anonymous.get("/dashboard/..%2Fsettings.py").status_code == 404
        # The data still needs a key.
        assert anonymous.get("/jobs").status_code == 401
    paths = service.client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(path.startswith("/dashboard") for path in paths)


def _count_points(page: Page) -> int:
    count: int = page.evaluate(CHART_POINTS)
    return count


def _rounded(boxes: list[list[float]]) -> list[list[float]]:
    return sorted([round(value, 2) for value in box] for box in boxes)


def _wait_for(page: Page, function: str, timeout: float = 60) -> None:
    """Poll `function` in the page until it returns true. Not `page.wait_for_function`: that evaluates
    strings with eval(), which the page's Content-Security-Policy forbids."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(function):
        assert time.monotonic() < deadline, f"never true within {timeout} s: {function}"
        page.wait_for_timeout(200)


@pytest.mark.slow
def test_a_training_charted_live_cancelled_and_tried(service: Service, page: Page, tmp_path: Path) -> None:
    make_shapes(service.datasets_dir, DATASET, splits=(("train", 16), ("valid", 8)), max_size=112)
    spec = tiny_spec(DATASET, name="dashboard-live", training={"max_epochs": 30, "batch_size": 8})
    job_id = service.submit(spec)["id"]

    page.goto(service.base_url + "/")
    page.fill("#key-input", service.admin_key)
    page.click("#key-form button[type=submit]")
    row = page.locator(f"#jobs tr[data-job-id='{job_id}']")
    row.wait_for()
    assert "dashboard-live" in row.inner_text()

    row.get_by_role("link").click()
    page.locator("#job-view").wait_for()
    expect(page.locator("#job-id")).to_have_text(job_id)
    # Points arrive through the stream while the job trains: the page is never reloaded.
    _wait_for(page, f"() => ({CHART_POINTS})() > 0", timeout=300)
    first = _count_points(page)
    _wait_for(page, f"() => ({CHART_POINTS})() > {first}", timeout=300)
    assert service.job(job_id)["status"] == "running"
    assert _count_points(page) > first
    # The try-it panel below needs a best checkpoint: an epoch's validation writes one before the
    # next epoch's first batch, where a cancel stops the training at the earliest.
    _wait_for(page, f"() => ({QUALITY_POINTS})() > 0", timeout=300)

    page.click("#cancel")
    _wait_for(page, "() => document.querySelector('#job-status').textContent === 'cancelled'", timeout=180)
    job = service.job(job_id)
    assert job["status"] == "cancelled"
    assert page.is_disabled("#cancel") and page.is_enabled("#resume")
    assert page.locator("#events li").count() > 0

    # The try-it panel: the cancelled job's best checkpoint (from its finished epochs) predicts.
    assert "ckpt_best" in job["artifacts"], job["artifacts"]
    image = tmp_path / "scene.png"
    image.write_bytes(encode(scene(96, 80, seed=3)))
    page.fill("#predict-conf", "0.01")
    page.set_input_files("#predict-file", str(image))
    page.click("#predict-form button[type=submit]")
    _wait_for(page, "() => document.querySelector('#predict-summary').textContent.includes('detection')", 300)
    answer = service.client.post(
        "/predict",
        data={"job_id": job_id, "conf": "0.01"},
        files=[("files", ("scene.png", image.read_bytes(), "image/png"))],
        timeout=300,
    )
    assert answer.status_code == 200, answer.text
    detections: list[dict[str, Any]] = answer.json()["images"][0]["detections"]
    assert detections, "conf=0.01 leaves boxes even for a barely trained model"
    drawn = page.eval_on_selector_all(
        "#predict-boxes rect",
        "rects => rects.map(r => ['x', 'y', 'width', 'height'].map(a => Number(r.getAttribute(a))))",
    )
    expected = [
        [d["box"][0], d["box"][1], d["box"][2] - d["box"][0], d["box"][3] - d["box"][1]] for d in detections
    ]
    assert _rounded(drawn) == _rounded(expected)
    assert page.is_visible("#predict-image")

    # Resume continues the cancelled job (its status comes back through the restarted stream).
    page.click("#resume")
    _wait_for(page, "() => document.querySelector('#job-status').textContent === 'running'", timeout=180)
    assert service.job(job_id)["attempt"] == 2
    page.click("#cancel")
    _wait_for(page, "() => document.querySelector('#job-status').textContent === 'cancelled'", timeout=180)
    assert service.job(job_id)["status"] == "cancelled"

    # The list filters by status, and the overlay view draws both jobs' series of one metric.
    page.goto(service.base_url + "/#/")
    page.select_option("#status-filter", "cancelled")
    page.locator(f"#jobs tr[data-job-id='{job_id}']").wait_for()
    page.select_option("#status-filter", "queued")
    page.locator(f"#jobs tr[data-job-id='{job_id}']").wait_for(state="detached")
    loss = next(p["name"] for p in service.metrics(job_id) if "loss" in p["name"].lower())
    page.goto(f"{service.base_url}/#/compare?a={job_id}&b={job_id}&metric={loss}")
    _wait_for(
        page,
        "() => document.querySelectorAll('#chart-compare polyline').length === 2"
        " && document.querySelector('#chart-compare polyline').points.numberOfItems > 0",
    )
