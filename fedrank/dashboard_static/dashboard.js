// fedrank dashboard: polls /api/state and redraws. Every string from the run directory is
// written with textContent (never innerHTML); strings given to plotly (which reads a few
// HTML-like tags in labels) are entity-escaped first.
"use strict";

const REFRESH_MS = Number(document.body.dataset.refreshMs) || 2000;
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
  "#7f7f7f", "#bcbd22", "#17becf"];
let lastText = null;

function plotText(value) {
  // Plotly decodes &amp; &lt; &gt; back to text; with no "<" left it sees no tags.
  return String(value).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

function fmt(value, digits) {
  if (value === null || value === undefined) return "–";
  if (value === "inf") return "∞";
  if (typeof value === "number") return value.toFixed(digits === undefined ? 4 : digits);
  return String(value);
}

function plotNum(value) {
  return typeof value === "number" ? value : null;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fillTable(id, items, build, empty) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  if (!items.length) {
    const tr = document.createElement("tr");
    const td = cell(tr, empty);
    td.colSpan = document.querySelectorAll("#" + id + " thead th").length;
    td.className = "muted";
    body.appendChild(tr);
    return;
  }
  for (const item of items) {
    const tr = document.createElement("tr");
    build(tr, item);
    body.appendChild(tr);
  }
}

function header(state) {
  const run = state.run;
  document.getElementById("run-name").textContent = run.name;
  const badge = document.getElementById("run-status");
  badge.textContent = run.status;
  badge.className = "badge " + run.status;
  const planned = run.rounds_planned;
  const bar = document.getElementById("round-progress");
  bar.max = planned || Math.max(run.rounds_done, 1);
  bar.value = run.rounds_done;
  let text = "round " + run.rounds_done + " / " + (planned === null ? "?" : planned);
  const last = state.rounds[state.rounds.length - 1];
  if (last && typeof last.seconds === "number" && planned && run.rounds_done < planned) {
    const eta = last.seconds * (planned - run.rounds_done);
    text += " · about " + Math.round(eta) + " s left";
  }
  document.getElementById("round-text").textContent = text;
  const cfg = Object.entries(run.config).map(([k, v]) => k + "=" + v);
  document.getElementById("run-config").textContent = cfg.join("  ·  ");
  document.getElementById("updated").textContent = run.updated || "-";
  document.getElementById("refresh").textContent = (REFRESH_MS / 1000) + " s";
}

function qualityChart(state) {
  const traces = [];
  const rows = (state.initial ? [state.initial] : []).concat(state.rounds);
  const rounds = rows.map((r) => r.round);
  const hasViews = rows.some((r) => r.views);
  const metrics = [["ndcg@10", "x", "y"], ["auc", "x2", "y2"]];
  const views = hasViews ? ["unseen", "seen"] : [null];
  metrics.forEach(([metric, xa, ya], m) => {
    views.forEach((view, v) => {
      const values = rows.map((r) => plotNum(view && r.views && r.views[view]
        ? r.views[view][metric] : r[metric]));
      traces.push({
        x: rounds, y: values, xaxis: xa, yaxis: ya, mode: "lines+markers",
        name: plotText("federated" + (view ? " (" + view + ")" : "")),
        legendgroup: "fed" + v, showlegend: m === 0,
        line: { color: COLORS[v], dash: v ? "dot" : "solid" },
      });
    });
    let b = 0;
    for (const [name, byView] of Object.entries(state.baselines)) {
      for (const view of Object.keys(byView)) {
        if (hasViews ? !views.includes(view) : view !== "unseen") continue;
        const value = byView[view][metric];
        if (typeof value !== "number" || !rounds.length) continue;
        traces.push({
          x: [Math.min(...rounds), Math.max(...rounds)], y: [value, value], xaxis: xa,
          yaxis: ya, mode: "lines", name: plotText(name + (hasViews ? " (" + view + ")" : "")),
          legendgroup: "b" + name + view, showlegend: m === 0,
          line: { color: COLORS[(2 + b) % COLORS.length], dash: view === "seen" ? "dot" : "dash",
            width: 1.5 },
        });
      }
      b += 1;
    }
  });
  const layout = {
    grid: { rows: 1, columns: 2, pattern: "independent" },
    margin: { t: 30, r: 10, b: 40, l: 50 },
    xaxis: { title: { text: "round" }, dtick: rounds.length > 20 ? undefined : 1 },
    xaxis2: { title: { text: "round" }, dtick: rounds.length > 20 ? undefined : 1 },
    yaxis: { title: { text: "NDCG@10" } }, yaxis2: { title: { text: "AUC" } },
    legend: { orientation: "h", y: -0.25 },
    uirevision: "quality",
  };
  Plotly.react("quality-chart", traces, layout, { displaylogo: false, responsive: true });
}

function epsilonChart(state) {
  const traces = [];
  state.nodes.forEach((node, i) => {
    const color = COLORS[i % COLORS.length];
    const pts = node.epsilon.filter((p) => typeof p[1] === "number");
    traces.push({ x: pts.map((p) => p[0]), y: pts.map((p) => p[1]), mode: "lines+markers",
      name: plotText(node.name), legendgroup: plotText(node.name), line: { color } });
    if (node.refusals.length) {
      traces.push({ x: node.refusals.map((r) => r.round),
        y: node.refusals.map(() => plotNum(node.epsilon_now)), mode: "markers",
        marker: { symbol: "x", size: 11, color }, name: plotText(node.name + " refused"),
        legendgroup: plotText(node.name), showlegend: false });
    }
  });
  const allRounds = state.nodes.flatMap((n) => n.epsilon.map((p) => p[0])
    .concat(n.refusals.map((r) => r.round)));
  const xs = allRounds.length ? [Math.min(...allRounds), Math.max(...allRounds)] : [0, 1];
  const budget = state.run.epsilon_budget;
  if (typeof budget === "number") {
    traces.push({ x: xs, y: [budget, budget], mode: "lines", name: "budget",
      line: { color: "#a00", dash: "dash" } });
  }
  state.nodes.forEach((node, i) => {
    if (typeof node.cap === "number") {
      traces.push({ x: xs, y: [node.cap, node.cap], mode: "lines",
        name: plotText("cap " + node.name),
        line: { color: COLORS[i % COLORS.length], dash: "dot", width: 1 } });
    }
  });
  const layout = {
    margin: { t: 20, r: 10, b: 40, l: 50 },
    xaxis: { title: { text: "round" }, dtick: xs[1] - xs[0] > 20 ? undefined : 1 },
    yaxis: { title: { text: "ε (cumulative)" }, rangemode: "tozero" },
    legend: { orientation: "v" }, uirevision: "epsilon",
  };
  Plotly.react("epsilon-chart", traces, layout, { displaylogo: false, responsive: true });
}

function tables(state) {
  fillTable("nodes-table", state.nodes, (tr, n) => {
    cell(tr, n.name);
    cell(tr, fmt(n.epsilon_now), "num eps");
    cell(tr, fmt(n.budget, 2), "num");
    cell(tr, fmt(n.cap, 2), "num");
    cell(tr, n.status, "status");
    cell(tr, n.last ? "round " + n.last.round + ": " + n.last.kind +
      (n.last.detail ? " — " + n.last.detail : "") : "–");
    if (/budget|refused|rejected|not scheduled/.test(n.status)) tr.className = "bad";
    else if (n.status.startsWith("behind")) tr.className = "warn";
  }, "no ledger lines yet");
  fillTable("replies-table", state.replies.slice().reverse(), (tr, r) => {
    cell(tr, String(r.round), "num");
    cell(tr, r.node);
    cell(tr, r.kind);
    cell(tr, r.reason);
    if (r.kind === "rejected" || r.kind === "downweighted") tr.className = "bad";
  }, "none: every reply so far was used");
  const key = state.release_key;
  document.getElementById("release-key").textContent = key
    ? "Signatures checked with the server's public key " + key.fingerprint + " (" + key.path + ")."
    : (state.releases.length ? "No server public key found: signatures not checked." : "");
  fillTable("releases-table", state.releases, (tr, r) => {
    cell(tr, r.name);
    cell(tr, r.round === null ? "–" : String(r.round), "num");
    cell(tr, r.created_at);
    cell(tr, fmt(r.epsilon_max), "num");
    cell(tr, fmt(r.metrics["ndcg@10"]), "num");
    cell(tr, r.signature);
    const td = cell(tr, "");
    const code = document.createElement("code");
    code.textContent = r.key_fingerprint ? r.key_fingerprint.slice(0, 23) + "…" : "–";
    if (r.key_fingerprint) code.title = r.key_fingerprint;
    td.appendChild(code);
    if (r.signature !== "valid") tr.className = "bad";
  }, "no releases (release-every = 0, or none due yet)");
}

function render(state) {
  header(state);
  qualityChart(state);
  epsilonChart(state);
  tables(state);
  document.body.dataset.rounds = String(state.run.rounds_done);
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const response = await fetch("api/state", { credentials: "same-origin", cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    const text = await response.text();
    if (text !== lastText) {
      lastText = text;
      render(JSON.parse(text));
    }
    error.hidden = true;
  } catch (err) {
    error.textContent = "cannot refresh: " + err.message;
    error.hidden = false;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
