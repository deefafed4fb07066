// The operator page: polls /api/status every second and redraws. Plain DOM, no library.
"use strict";

const CHARTS = [
  ["calls_per_s", "calls/s", (v) => v.toFixed(2)],
  ["p95_ms", "p95", (v) => `${v.toFixed(0)} ms`],
  ["error_rate", "errors", (v) => `${(v * 100).toFixed(1)}%`],
  ["fallback_rate", "fallback", (v) => `${(v * 100).toFixed(1)}%`],
];
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  for (const child of children) node.append(child);
  return node;
}

function chart(points, key, label, format) {
  const width = 220, height = 48;
  const values = points.map((p) => p[key] ?? 0);
  const top = Math.max(...values, 1e-9);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  if (values.length > 1) {
    const line = document.createElementNS(SVG, "polyline");
    const step = width / (values.length - 1);
    line.setAttribute("points", values.map((v, i) =>
      `${(i * step).toFixed(1)},${(height - 2 - (v / top) * (height - 4)).toFixed(1)}`).join(" "));
    svg.append(line);
  }
  const last = values.length ? format(values[values.length - 1]) : "-";
  return el("div", { class: "chart", "data-chart": key }, `${label}: ${last} (max ${format(top)})`, svg);
}

function endpoint(e) {
  const gone = e.gone_s !== undefined ? ` (gone ${Math.round(e.gone_s)} s ago)` : "";
  return el("li", { class: "endpoint", "data-address": e.address, "data-state": e.state },
    el("span", { class: `badge state-${e.state}` }, e.state), e.address,
    el("span", { class: "muted" }, `envoy: ${e.envoy}${gone}`));
}

// The registry's live figures of the calls a pool served, over its window (e.g. 300s).
function poolFigures(live) {
  if (!live) return "";
  const ms = (duration) => duration ? `${(parseFloat(duration) * 1000).toFixed(0)} ms` : "-";
  return el("div", { class: "muted pool-live" },
    `last ${live.window}: ${live.calls} calls, p50 ${ms(live.latency_p50)}, p95 ${ms(live.latency_p95)}, ` +
    `errors ${((live.error_rate || 0) * 100).toFixed(1)}%, $${(live.cost_usd || 0).toPrecision(3)}`);
}

function model(m, history) {
  const p95 = m.p95_ms === null ? "-" : `${m.p95_ms.toFixed(0)} ms`;
  const figure = (label, value) => el("span", { class: "figure" }, `${label} `, el("b", {}, value));
  const pools = m.pools.map((pool) => el("div", { class: "pool", "data-pool": pool.id, "data-priority": pool.priority },
    el("div", {}, el("b", {}, pool.id), el("span", { class: "muted" }, ` fallback ${pool.priority}`)),
    poolFigures(pool.live),
    el("ul", {}, ...(pool.endpoints.length ? pool.endpoints.map(endpoint)
      : [el("li", { class: "muted" }, "(no endpoint)")]))));
  return el("section", { class: "model", "data-model": m.id },
    el("div", { class: "model-head" }, el("h2", {}, m.id),
      figure("calls/s", m.calls_per_s.toFixed(2)), figure("errors", `${(m.error_rate * 100).toFixed(1)}%`),
      figure("p95", p95), figure("fallback", `${(m.fallback_rate * 100).toFixed(1)}%`)),
    el("div", { class: "charts" }, ...CHARTS.map(([key, label, format]) => chart(history, key, label, format))),
    el("div", { class: "pools" }, ...pools));
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const reply = await fetch("/api/status", { cache: "no-store" });
    const view = await reply.json();
    document.getElementById("models").replaceChildren(
      ...view.models.map((m) => model(m, view.history[m.id] || [])));
    if (view.time) {
      document.getElementById("updated").textContent = `updated ${new Date(view.time * 1000).toLocaleTimeString()}`;
    }
    error.hidden = !view.error;
    error.textContent = view.error || "";
  } catch (err) {
    error.hidden = false;
    error.textContent = `the page's server does not answer: ${err}`;
  }
}

refresh();
setInterval(refresh, 1000);
