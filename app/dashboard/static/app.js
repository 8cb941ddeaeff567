// The sg-jobs dashboard: plain JS, no library. Everything it shows comes from the API with the
// user's key (sessionStorage); API text is only ever put in the page with textContent.
"use strict";

const KEY_STORAGE = "sgjobs.key";
const SVG_NS = "http://www.w3.org/2000/svg";
const MAX_POINTS = 500; // per series, downsampled by the server (GET /jobs/{id}/metrics?max_points=)
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
const EVENT_TAIL = 200;

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- API access

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function problemText(response) {
  try {
    const problem = await response.json();
    return problem.detail || problem.title || response.statusText;
  } catch (_) {
    return response.statusText;
  }
}

async function request(path, options = {}) {
  const headers = new Headers(options.headers || {});
  headers.set("Authorization", "Bearer " + apiKey());
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    sessionStorage.removeItem(KEY_STORAGE);
    route();
    throw new ApiError(401, "the API key was refused: " + (await problemText(response)));
  }
  if (!response.ok) throw new ApiError(response.status, await problemText(response));
  return response;
}

async function api(path, options = {}) {
  const response = await request(path, options);
  return response.status === 204 ? null : response.json();
}

function showMessage(text) {
  const message = $("message");
  message.textContent = text || "";
  message.hidden = !text;
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function svg(tag, attributes = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  return node;
}

function formatNumber(value) {
  if (value === null || value === undefined) return "–";
  const magnitude = Math.abs(value);
  if (magnitude !== 0 && (magnitude < 1e-3 || magnitude >= 1e5)) return value.toExponential(2);
  return value.toFixed(4).replace(/\.?0+$/, "") || "0";
}

function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.round(seconds);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

// ---------------------------------------------------------------- Server-Sent Events over fetch

// EventSource cannot send Authorization, so the stream is read with fetch and parsed here.
// `onMessage(event, data, id)` gets each message; resolves with the last id when the stream ends.
async function readEventStream(path, lastEventId, signal, onMessage) {
  const headers = { Accept: "text/event-stream" };
  if (lastEventId) headers["Last-Event-ID"] = lastEventId;
  const response = await request(path, { headers, signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let lastId = lastEventId;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return lastId;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      let id = null;
      for (const line of block.split("\n")) {
        if (line === "" || line.startsWith(":")) continue; // keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
        else if (field === "id") id = text;
      }
      if (id !== null) lastId = id;
      if (data.length) onMessage(event, JSON.parse(data.join("\n")), id);
    }
  }
}

// ---------------------------------------------------------------- charts (plain SVG)

// series: Map name -> [{x, y}] sorted by x. Draws one polyline per series, axes and a legend.
function drawChart(target, series, { log = false } = {}) {
  const width = target.clientWidth || 600;
  const height = target.clientHeight || 260;
  const pad = { left: 52, right: 10, top: 10, bottom: 22 };
  target.replaceChildren();
  target.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const all = [...series.values()].flat();
  target.dataset.points = String(all.length);
  if (!all.length) {
    target.append(Object.assign(svg("text", { x: width / 2 - 40, y: height / 2 }), { textContent: "no points yet" }));
    return;
  }
  const yOf = (v) => (log ? Math.log10(Math.max(v, 1e-12)) : v);
  let [x0, x1] = [Math.min(...all.map((p) => p.x)), Math.max(...all.map((p) => p.x))];
  let [y0, y1] = [Math.min(...all.map((p) => yOf(p.y))), Math.max(...all.map((p) => yOf(p.y)))];
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  if (y0 === y1) [y0, y1] = [y0 - 0.5, y1 + 0.5];
  const sx = (x) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const sy = (y) => height - pad.bottom - ((yOf(y) - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
  target.append(
    svg("line", { class: "axis", x1: pad.left, y1: height - pad.bottom, x2: width - pad.right, y2: height - pad.bottom }),
    svg("line", { class: "axis", x1: pad.left, y1: pad.top, x2: pad.left, y2: height - pad.bottom }),
  );
  const label = (text, x, y, anchor) => {
    const node = svg("text", { x, y, "text-anchor": anchor });
    node.textContent = text;
    target.append(node);
  };
  const yLabel = (v) => formatNumber(log ? 10 ** v : v);
  label(yLabel(y1), pad.left - 4, pad.top + 8, "end");
  label(yLabel(y0), pad.left - 4, height - pad.bottom, "end");
  label(formatNumber(x0), pad.left, height - 6, "start");
  label(formatNumber(x1), width - pad.right, height - 6, "end");
  let index = 0;
  for (const [name, points] of series) {
    const colour = COLOURS[index % COLOURS.length];
    const line = svg("polyline", {
      stroke: colour,
      points: points.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(" "),
    });
    line.dataset.series = name;
    const title = svg("title");
    title.textContent = name;
    line.append(title);
    target.append(line);
    if (points.length === 1) target.append(svg("circle", { cx: sx(points[0].x), cy: sy(points[0].y), r: 3, fill: colour }));
    const legend = svg("text", { x: width - pad.right - 4, y: pad.top + 12 + 13 * index, "text-anchor": "end", fill: colour });
    legend.textContent = name;
    legend.style.fill = colour;
    target.append(legend);
    index += 1;
  }
}

// ---------------------------------------------------------------- metric series of a job

const PER_CLASS = /^(?:Valid_)?AP@[0-9.:]+_(.+)$/;

function chartOf(name) {
  if (PER_CLASS.test(name)) return "per-class";
  if (/^LR(\/|$)/.test(name)) return "lr";
  if (/loss/i.test(name)) return "loss";
  if (/mAP|precision|recall|F1/i.test(name)) return "quality";
  return null;
}

class Series {
  constructor() {
    this.points = new Map(); // name -> [{x, y, epoch}]
  }
  add(point) {
    const x = point.step ?? point.epoch ?? 0;
    let list = this.points.get(point.name);
    if (!list) this.points.set(point.name, (list = []));
    list.push({ x, y: point.value, epoch: point.epoch });
    if (list.length > 1 && list[list.length - 2].x > x) list.sort((a, b) => a.x - b.x);
  }
  dropFromEpoch(epoch) {
    for (const [name, list] of this.points) {
      this.points.set(name, list.filter((p) => p.epoch === null || p.epoch < epoch));
    }
  }
  group(chart) {
    return new Map([...this.points].filter(([name, list]) => list.length && chartOf(name) === chart));
  }
}

// ---------------------------------------------------------------- views

let leave = () => {}; // stops the current view's timers and streams

function show(view) {
  for (const id of ["key-view", "list-view", "job-view", "compare-view"]) $(id).hidden = id !== view;
  $("forget-key").hidden = view === "key-view";
}

function statusCell(status) {
  return el("td", status, "status-" + status);
}

let jobCache = [];

async function loadJobs() {
  const status = $("status-filter").value;
  const query = new URLSearchParams({ limit: "200" });
  if (status) query.set("status", status);
  const page = await api("/jobs?" + query);
  jobCache = page.items;
  const jobs = [...page.items];
  if ($("sort").value === "best") {
    jobs.sort((a, b) => (b.best_metric.value ?? -Infinity) - (a.best_metric.value ?? -Infinity));
  }
  const rows = jobs.map((job) => {
    const row = document.createElement("tr");
    row.dataset.jobId = job.id;
    const link = el("a", job.name || job.id);
    link.href = "#/jobs/" + encodeURIComponent(job.id);
    const name = el("td");
    name.append(link);
    const bar = document.createElement("progress");
    bar.max = 100;
    bar.value = job.progress.percent;
    const progress = el("td");
    progress.append(bar, el("span", " " + Math.round(job.progress.percent) + "%"));
    const best = job.best_metric.value === null ? "–" : `${job.best_metric.name} ${formatNumber(job.best_metric.value)}`;
    row.append(
      name,
      statusCell(job.status),
      progress,
      el("td", FINISHED.has(job.status) ? "–" : formatSeconds(job.progress.eta_seconds)),
      el("td", best),
      el("td", new Date(job.created_at).toLocaleString()),
    );
    return row;
  });
  $("jobs").tBodies[0].replaceChildren(...rows);
  $("job-count").textContent = `${page.total} job(s)`;
}

function listView() {
  show("list-view");
  let timer = null;
  let stopped = false;
  const refresh = async () => {
    try {
      await loadJobs();
      showMessage("");
    } catch (error) {
      showMessage(error.message);
    }
    if (!stopped) timer = setTimeout(refresh, 3000);
  };
  refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

function renderJob(job) {
  $("job-name").textContent = job.name || job.id;
  $("job-id").textContent = job.id;
  const status = $("job-status");
  status.textContent = job.status + (job.cancel_requested && !FINISHED.has(job.status) ? " (cancelling)" : "");
  status.className = "status-" + job.status;
  $("job-best").textContent =
    job.best_metric.value === null ? job.best_metric.name + " –" : `${job.best_metric.name} ${formatNumber(job.best_metric.value)}`;
  renderProgress(job.progress, job.status);
  const error = $("job-error");
  error.hidden = !job.error;
  error.textContent = job.error ? `${job.error.reason}: ${job.error.message}` : "";
  $("cancel").disabled = FINISHED.has(job.status) || job.cancel_requested;
  $("resume").disabled = !(job.status === "failed" || job.status === "cancelled");
  const dataset = $("dataset");
  const spec = job.spec.dataset;
  const rows = [
    ["Source", spec.id ? "registered " + spec.id : `${spec.format || ""} ${spec.path || ""}`.trim()],
    ["Classes", job.classes ? job.classes.join(", ") : "not read yet"],
    ["Input size", job.spec.input_size.join(" × ")],
  ];
  dataset.replaceChildren(...rows.flatMap(([term, value]) => [el("dt", term), el("dd", value)]));
}

function renderProgress(progress, status) {
  $("job-progress").value = progress.percent;
  const epoch = progress.epoch === null ? "–" : progress.epoch + 1;
  $("job-progress-text").textContent = `epoch ${epoch}/${progress.max_epochs} · ${Math.round(progress.percent)}%`;
  $("job-eta").textContent = status && FINISHED.has(status) ? "–" : formatSeconds(progress.eta_seconds);
}

function renderPerClass(series) {
  const latest = [];
  for (const [name, list] of series.points) {
    const match = PER_CLASS.exec(name);
    if (match && list.length) latest.push([match[1], list[list.length - 1].y, name]);
  }
  latest.sort((a, b) => b[1] - a[1]);
  $("per-class").tBodies[0].replaceChildren(
    ...latest.map(([cls, value, name]) => {
      const row = document.createElement("tr");
      row.append(el("td", cls), el("td", formatNumber(value)), el("td", name));
      return row;
    }),
  );
}

function addEvent(event) {
  const list = $("events");
  const item = el("li", `${new Date(event.time).toLocaleTimeString()} [${event.kind}] ${event.message}`, "level-" + event.level);
  list.append(item);
  while (list.children.length > EVENT_TAIL) list.firstElementChild.remove();
  list.scrollTop = list.scrollHeight;
  // The dataset's own report arrives as events: its summary, warnings and problems.
  if (/dataset/i.test(event.message) || (event.data && event.data.problems)) {
    const note = el("li", event.message, "level-" + event.level);
    $("dataset-notes").append(note);
    for (const problem of (event.data && event.data.problems) || []) {
      $("dataset-notes").append(el("li", typeof problem === "string" ? problem : JSON.stringify(problem), "level-error"));
    }
  }
}

function jobView(jobId) {
  show("job-view");
  const controller = new AbortController();
  const series = new Series();
  let job = null;
  let drawPending = false;
  $("events").replaceChildren();
  $("dataset-notes").replaceChildren();
  $("predict-view").hidden = true;
  $("predict-summary").textContent = "";
  for (const id of ["chart-loss", "chart-quality", "chart-lr"]) $(id).replaceChildren();

  const redraw = () => {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => {
      drawPending = false;
      drawChart($("chart-loss"), series.group("loss"));
      drawChart($("chart-quality"), series.group("quality"));
      drawChart($("chart-lr"), series.group("lr"), { log: true });
      renderPerClass(series);
    });
  };

  const onMessage = (event, data) => {
    if (event === "status") {
      job = data;
      renderJob(job);
    } else if (event === "progress") {
      renderProgress(data, job && job.status);
    } else if (event === "metric") {
      series.add(data);
      redraw();
    } else if (event === "superseded") {
      series.dropFromEpoch(data.data.superseded_from_epoch);
      addEvent(data);
      redraw();
    } else if (event === "event") {
      addEvent(data);
    }
  };

  const run = async () => {
    job = await api(`/jobs/${encodeURIComponent(jobId)}`);
    renderJob(job);
    // The history, downsampled by the server; the stream follows on from its newest point.
    const query = new URLSearchParams({ max_points: String(MAX_POINTS) });
    const page = await api(`/jobs/${encodeURIComponent(jobId)}/metrics?${query}`);
    for (const point of page.items) series.add(point);
    redraw();
    let lastId = `0.${page.next_cursor || 0}.0`;
    while (!controller.signal.aborted) {
      try {
        lastId = await readEventStream(`/jobs/${encodeURIComponent(jobId)}/stream`, lastId, controller.signal, onMessage);
        showMessage("");
      } catch (error) {
        if (controller.signal.aborted) return;
        if (error instanceof ApiError && error.status !== 503) throw error;
        showMessage("stream interrupted, reconnecting: " + error.message);
      }
      if (job && FINISHED.has(job.status)) return; // the stream ends after a terminal status
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  };
  run().catch((error) => {
    if (!controller.signal.aborted) showMessage(error.message);
  });

  const act = async (action) => {
    try {
      const options = { method: "POST" };
      if (action === "resume") Object.assign(options, { headers: { "Content-Type": "application/json" }, body: "{}" });
      job = await api(`/jobs/${encodeURIComponent(jobId)}/${action}`, options);
      renderJob(job);
      showMessage("");
      // A resumed job streams again from where the ended stream stopped.
      if (action === "resume") {
        leave();
        leave = jobView(jobId);
      }
    } catch (error) {
      showMessage(error.message);
    }
  };
  const cancel = () => act("cancel");
  const resume = () => act("resume");
  const predict = (submit) => {
    submit.preventDefault();
    tryIt(jobId);
  };
  $("cancel").addEventListener("click", cancel);
  $("resume").addEventListener("click", resume);
  $("predict-form").addEventListener("submit", predict);
  const onResize = () => redraw();
  window.addEventListener("resize", onResize);
  return () => {
    controller.abort();
    $("cancel").removeEventListener("click", cancel);
    $("resume").removeEventListener("click", resume);
    $("predict-form").removeEventListener("submit", predict);
    window.removeEventListener("resize", onResize);
  };
}

let imageUrl = null;

async function tryIt(jobId) {
  const file = $("predict-file").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("job_id", jobId);
  form.append("conf", $("predict-conf").value || "0.25");
  form.append("files", file, file.name);
  $("predict-summary").textContent = "detecting…";
  try {
    const answer = await api("/predict", { method: "POST", body: form });
    const image = answer.images[0];
    if (imageUrl) URL.revokeObjectURL(imageUrl);
    imageUrl = URL.createObjectURL(file);
    $("predict-image").src = imageUrl;
    const boxes = $("predict-boxes");
    boxes.setAttribute("viewBox", `0 0 ${image.width} ${image.height}`);
    boxes.setAttribute("preserveAspectRatio", "none");
    boxes.replaceChildren();
    for (const detection of image.detections) {
      const [x1, y1, x2, y2] = detection.box;
      const rect = svg("rect", { x: x1, y: y1, width: x2 - x1, height: y2 - y1 });
      rect.dataset.className = detection.class_name;
      const title = svg("title");
      title.textContent = `${detection.class_name} ${detection.score.toFixed(2)}`;
      rect.append(title);
      const label = svg("text", { x: x1 + 2, y: Math.max(y1 - 2, 10) });
      label.textContent = `${detection.class_name} ${detection.score.toFixed(2)}`;
      boxes.append(rect, label);
    }
    $("predict-view").hidden = false;
    $("predict-summary").textContent = `${image.detections.length} detection(s) at conf ${answer.conf}, ${Math.round(answer.inference_ms)} ms`;
  } catch (error) {
    $("predict-summary").textContent = error.message;
  }
}

function compareView(params) {
  show("compare-view");
  let stopped = false;
  const fill = async () => {
    if (!jobCache.length) jobCache = (await api("/jobs?limit=200")).items;
    for (const [id, chosen] of [["compare-a", params.get("a")], ["compare-b", params.get("b")]]) {
      const select = $(id);
      select.replaceChildren(
        ...jobCache.map((job) => {
          const option = el("option", `${job.name || job.id} (${job.status})`);
          option.value = job.id;
          option.selected = job.id === chosen;
          return option;
        }),
      );
    }
    if (params.get("metric")) $("compare-metric").value = params.get("metric");
    if (params.get("a") && params.get("b")) await overlay(params.get("a"), params.get("b"), $("compare-metric").value);
  };
  const submit = (event) => {
    event.preventDefault();
    const query = new URLSearchParams({ a: $("compare-a").value, b: $("compare-b").value, metric: $("compare-metric").value });
    location.hash = "#/compare?" + query;
  };
  $("compare-form").addEventListener("submit", submit);
  fill().catch((error) => !stopped && showMessage(error.message));
  return () => {
    stopped = true;
    $("compare-form").removeEventListener("submit", submit);
  };
}

async function overlay(a, b, metric) {
  const series = new Map();
  const names = new Set();
  for (const [side, jobId] of [["A", a], ["B", b]]) {
    const job = jobCache.find((j) => j.id === jobId);
    const query = new URLSearchParams({ max_points: String(MAX_POINTS) });
    const page = await api(`/jobs/${encodeURIComponent(jobId)}/metrics?${query}`);
    const points = [];
    for (const point of page.items) {
      names.add(point.name);
      if (point.name === metric) points.push({ x: point.step ?? point.epoch ?? 0, y: point.value });
    }
    points.sort((p, q) => p.x - q.x);
    series.set(`${side} ${job ? job.name || job.id : jobId}: ${metric}`, points);
  }
  $("compare-metrics").replaceChildren(...[...names].sort().map((name) => Object.assign(el("option"), { value: name })));
  drawChart($("chart-compare"), series, { log: /^LR/.test(metric) });
}

// ---------------------------------------------------------------- routing

function route() {
  leave();
  leave = () => {};
  showMessage("");
  if (!apiKey()) {
    show("key-view");
    $("key-input").focus();
    return;
  }
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const job = /^\/jobs\/([^/]+)$/.exec(path);
  if (job) leave = jobView(decodeURIComponent(job[1]));
  else if (path === "/compare") leave = compareView(new URLSearchParams(query || ""));
  else leave = listView();
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
    $("key-input").value = "";
    route();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    route();
  });
  $("status-filter").addEventListener("change", () => loadJobs().catch((error) => showMessage(error.message)));
  $("sort").addEventListener("change", () => loadJobs().catch((error) => showMessage(error.message)));
  window.addEventListener("hashchange", route);
  route();
});
