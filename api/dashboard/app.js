// Shoal dashboard: follows /v1/stream (server-sent events) and draws tables and SVG charts.
// No framework and no chart library: the page must work with no network beyond this server.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const MAX_SAMPLES = 1800;
  const MAX_EVENT_ROWS = 100;
  const MAX_BARS = 14;
  // A pause in the samples longer than this (a lost stream) breaks the lines.
  const GAP_S = 6;

  const state = {
    samples: [],
    events: new Map(),
    latest: null,
    processed: new Map(), // container name -> {id, pool, processed, gone}
    pools: [],
    pool: "",
    windowS: 300,
    paused: false,
    lastEventSeq: 0,
    shownEventSeq: 0,
    renderQueued: false,
    tablesKey: "",
  };

  const $ = (id) => document.getElementById(id);

  // -- stream ------------------------------------------------------------------------

  function connect() {
    // With an API token, open the page as /?access_token=...; the stream needs it too.
    const token = new URLSearchParams(window.location.search).get("access_token");
    const source = new EventSource(
      token ? "/v1/stream?access_token=" + encodeURIComponent(token) : "/v1/stream",
    );
    source.addEventListener("open", () => setConn("live", "Live"));
    source.addEventListener("error", () => {
      setConn("down", source.readyState === EventSource.CLOSED ? "Disconnected" : "Reconnecting…");
    });
    source.addEventListener("hello", (msg) => {
      const hello = JSON.parse(msg.data);
      state.samples = hello.samples.slice(-MAX_SAMPLES);
      state.events.clear();
      hello.events.forEach(addEvent);
      state.processed.clear();
      for (const w of hello.departed ?? []) {
        state.processed.set(w.name, { id: w.id, pool: w.pool, processed: w.processed, gone: true });
      }
      if (hello.snapshot) applySnapshot(hello.snapshot, false);
      state.shownEventSeq = state.lastEventSeq;
      setConn("live", "Live");
      scheduleRender();
    });
    source.addEventListener("message", (msg) => {
      const snap = JSON.parse(msg.data);
      applySnapshot(snap, true);
      scheduleRender();
    });
  }

  function setConn(kind, text) {
    const el = $("conn");
    const shown = state.paused && kind === "live" ? "paused" : kind;
    el.dataset.state = shown;
    el.textContent = shown === "paused" ? "Paused" : text;
  }

  function addEvent(ev) {
    state.events.set(ev.seq, ev);
    if (ev.seq > state.lastEventSeq) state.lastEventSeq = ev.seq;
  }

  function applySnapshot(snap, asSample) {
    state.latest = snap;
    snap.events.forEach(addEvent);
    if (asSample) {
      const last = state.samples[state.samples.length - 1];
      if (!last || last.t < snap.t) {
        state.samples.push(sampleOf(snap));
        if (state.samples.length > MAX_SAMPLES) state.samples.shift();
      }
    }
    const live = new Set();
    for (const w of snap.workers) {
      live.add(w.name);
      state.processed.set(w.name, { id: w.id, pool: w.pool, processed: w.processed, gone: false });
    }
    for (const [name, rec] of state.processed) {
      if (!live.has(name)) rec.gone = true;
    }
    // Keep the departed ones that did work, but not without bound.
    if (state.processed.size > 200) {
      for (const [name, rec] of state.processed) {
        if (rec.gone && state.processed.size > 200) state.processed.delete(name);
      }
    }
    const names = Object.keys(snap.pools);
    if (names.join("\u0000") !== state.pools.join("\u0000")) {
      state.pools = names;
      updatePoolSelect();
    }
  }

  function sampleOf(snap) {
    const p = {};
    for (const [name, s] of Object.entries(snap.pools)) {
      p[name] = [s.queued, s.running, s.desired, s.ready, s.ready + s.starting];
    }
    return { t: snap.t, p };
  }

  // -- controls -----------------------------------------------------------------------

  function updatePoolSelect() {
    const select = $("pool");
    const keep = state.pool;
    select.replaceChildren(new Option("All pools", ""));
    for (const name of state.pools) select.add(new Option(name, name));
    state.pool = state.pools.includes(keep) ? keep : "";
    select.value = state.pool;
    select.closest("label").hidden = state.pools.length < 2;
  }

  function wireControls() {
    $("pool").addEventListener("change", (e) => {
      state.pool = e.target.value;
      state.tablesKey = "";
      scheduleRender();
    });
    $("window").addEventListener("change", (e) => {
      state.windowS = Number(e.target.value);
      scheduleRender();
    });
    $("pause").addEventListener("click", (e) => {
      state.paused = !state.paused;
      e.target.setAttribute("aria-pressed", String(state.paused));
      e.target.textContent = state.paused ? "Resume" : "Pause";
      setConn("live", "Live");
      scheduleRender();
    });
    let resizeTimer = 0;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(scheduleRender, 100);
    });
  }

  // -- rendering ----------------------------------------------------------------------

  function scheduleRender() {
    if (state.renderQueued || state.paused) return;
    state.renderQueued = true;
    requestAnimationFrame(() => {
      state.renderQueued = false;
      render();
    });
  }

  function render() {
    const snap = state.latest;
    if (!snap) return;
    renderStats(snap);
    renderAlerts(snap);
    renderQueueChart();
    renderReplicasChart();
    renderProcessed();
    renderTables(snap);
  }

  function selectedPools(snap) {
    return Object.keys(snap.pools).filter((n) => !state.pool || n === state.pool);
  }

  function sum(values) {
    let total = 0;
    let any = false;
    for (const v of values) {
      if (v !== null && v !== undefined) {
        total += v;
        any = true;
      }
    }
    return any ? total : null;
  }

  function fmt(n) {
    return n === null || n === undefined ? "–" : Number(n).toLocaleString("en");
  }

  function renderStats(snap) {
    const pools = selectedPools(snap).map((n) => snap.pools[n]);
    const queued = sum(pools.map((p) => p.queued));
    $("stat-queued").textContent = fmt(queued ?? 0);
    $("stat-running").textContent = fmt(sum(pools.map((p) => p.running)) ?? 0);
    const dead = sum(pools.map((p) => p.dead)) ?? 0;
    const observed = sum(pools.map((p) => p.ready + p.starting)) ?? 0;
    $("stat-observed").textContent = fmt(observed);
    $("stat-desired").textContent = fmt(sum(pools.map((p) => p.desired)));
    const ready = sum(pools.map((p) => p.ready)) ?? 0;
    const lo = sum(pools.map((p) => p.min));
    const hi = sum(pools.map((p) => p.max));
    $("stat-bounds").textContent =
      `observed / desired · ${fmt(ready)} ready` + (lo !== null ? ` · bounds ${lo}–${hi}` : "");
    $("stat-processed").textContent = fmt(sum(pools.map((p) => p.succeeded)) ?? 0);
    const failed = sum(pools.map((p) => p.failed)) ?? 0;
    $("stat-outcomes").textContent = `tasks succeeded · ${fmt(failed)} failed · ${fmt(dead)} dead`;
    const reasonEl = $("stat-reason");
    reasonEl.replaceChildren();
    const names = selectedPools(snap);
    if (!names.length) {
      reasonEl.append(el("li", null, "No pools declared."));
    }
    for (const name of names) {
      const p = snap.pools[name];
      const line = el("li", "reason");
      const head = names.length > 1 ? `${name}: ` : "";
      line.textContent = head + (p.reason ?? "no decision yet");
      if (p.panic) {
        const tag = document.createElement("span");
        tag.className = "panic";
        tag.textContent = " (panic mode)";
        line.append(tag);
      }
      reasonEl.append(line);
    }
  }

  function renderAlerts(snap) {
    const box = $("alerts");
    const parts = [];
    if (snap.policyError) {
      const div = el("div", "alert");
      div.append(el("strong", null, "The policy was refused; the last good one keeps running."));
      div.append(el("span", null, `Source: ${snap.policyError.source}`));
      const list = el("ul");
      for (const problem of snap.policyError.problems) list.append(el("li", null, problem));
      div.append(list);
      parts.push(div);
    }
    for (const name of selectedPools(snap)) {
      const p = snap.pools[name];
      if (p.lastError) {
        const div = el("div", "alert warn");
        div.append(el("strong", null, `Pool ${name}: last error`));
        div.append(el("span", null, p.lastError));
        if (p.backoffS > 0) div.append(el("span", null, ` (retrying in ${p.backoffS} s)`));
        parts.push(div);
      }
    }
    const key = JSON.stringify([snap.policyError, parts.map((d) => d.textContent)]);
    if (box.dataset.key !== key) {
      box.dataset.key = key;
      box.replaceChildren(...parts);
    }
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // -- charts ---------------------------------------------------------------------------

  function visibleSamples() {
    const n = state.samples.length;
    if (!n) return { samples: [], t0: 0, t1: 0 };
    const t1 = state.samples[n - 1].t;
    // A short history fills the chart instead of hugging its right edge; at least a minute.
    const t0 = t1 - Math.min(state.windowS, Math.max(60, t1 - state.samples[0].t));
    let i = n - 1;
    while (i > 0 && state.samples[i - 1].t >= t0) i--;
    // One sample before the window keeps the line from starting in mid-air.
    const from = Math.max(0, i - 1);
    return { samples: state.samples.slice(from), t0, t1 };
  }

  function seriesOf(samples, index) {
    const names = state.pool ? [state.pool] : null;
    return samples.map((s) => {
      const values = [];
      for (const [name, arr] of Object.entries(s.p)) {
        if (!names || names.includes(name)) values.push(arr[index]);
      }
      return [s.t, sum(values)];
    });
  }

  function renderQueueChart() {
    const { samples, t0, t1 } = visibleSamples();
    const queued = seriesOf(samples, 0);
    const running = seriesOf(samples, 1);
    const box = $("chart-queue");
    lineChart(box, {
      t0,
      t1,
      series: [
        { points: queued, cls: "queued", area: true },
        { points: running, cls: "running" },
      ],
    });
    const last = queued.length ? queued[queued.length - 1][1] ?? 0 : 0;
    const peak = Math.max(0, ...queued.map((p) => p[1] ?? 0));
    const lastRunning = running.length ? running[running.length - 1][1] ?? 0 : 0;
    label(box, `Queue length over the last ${windowText()}: now ${last} queued and ` +
      `${lastRunning} running; peak ${peak} queued.`);
  }

  function renderReplicasChart() {
    const { samples, t0, t1 } = visibleSamples();
    const desired = seriesOf(samples, 2);
    const ready = seriesOf(samples, 3);
    const observed = seriesOf(samples, 4);
    const events = [...state.events.values()].filter(
      (e) => e.time >= t0 && (!state.pool || e.pool === state.pool),
    );
    const box = $("chart-replicas");
    lineChart(box, {
      t0,
      t1,
      series: [
        { points: observed, cls: "observed", area: true },
        { points: ready, cls: "ready" },
        { points: desired, cls: "desired" },
      ],
      events,
    });
    const now = (s) => (s.length ? s[s.length - 1][1] ?? 0 : 0);
    label(box, `Replicas over the last ${windowText()}: desired ${now(desired)}, observed ` +
      `${now(observed)}, ready ${now(ready)}; ${events.length} scaling events in view.`);
  }

  function windowText() {
    return state.windowS >= 120 ? `${state.windowS / 60} minutes` : `${state.windowS} seconds`;
  }

  function label(box, text) {
    box.setAttribute("role", "img");
    box.setAttribute("aria-label", text);
  }

  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // Whole-number ticks, at most five steps: counts of tasks and replicas have no halves.
  function niceScale(v) {
    const top = Math.max(4, v);
    const mag = Math.pow(10, Math.floor(Math.log10(top)));
    for (const m of [0.1, 0.2, 0.25, 0.5, 1, 2, 2.5, 5, 10]) {
      const step = m * mag;
      if (Number.isInteger(step) && step * 5 >= top) {
        return { max: Math.ceil(top / step) * step, step };
      }
    }
    return { max: Math.ceil(top / (10 * mag)) * 10 * mag, step: 10 * mag };
  }

  function clock(t) {
    const d = new Date(t * 1000);
    return d.toLocaleTimeString("en-GB", { hour12: false });
  }

  function lineChart(box, { t0, t1, series, events = [] }) {
    const width = Math.max(240, box.clientWidth);
    const height = Math.max(120, box.clientHeight);
    const m = { l: 36, r: 12, t: 12, b: 22 };
    const w = width - m.l - m.r;
    const h = height - m.t - m.b;
    const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, "aria-hidden": "true" });

    let vmax = 0;
    for (const s of series) for (const [, v] of s.points) if (v !== null && v > vmax) vmax = v;
    const { max: ymax, step: ystep } = niceScale(vmax);
    const span = Math.max(1, t1 - t0);
    const x = (t) => m.l + ((t - t0) / span) * w;
    const y = (v) => m.t + h - (v / ymax) * h;

    for (let v = 0; v <= ymax; v += ystep) {
      const yy = y(v);
      svg.append(svgEl("line", { class: "grid-line", x1: m.l, x2: m.l + w, y1: yy, y2: yy }));
      svg.append(svgEl("text", { x: m.l - 6, y: yy + 4, "text-anchor": "end" }, fmt(v)));
    }
    const steps = [5, 10, 15, 30, 60, 120, 300, 600];
    const step = steps.find((s) => span / s <= 6) || 900;
    for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) {
      const xx = x(t);
      svg.append(svgEl("line", { class: "grid-line", x1: xx, x2: xx, y1: m.t, y2: m.t + h }));
      svg.append(svgEl("text", { x: xx, y: height - 6, "text-anchor": "middle" }, clock(t)));
    }
    svg.append(svgEl("line", { class: "axis", x1: m.l, x2: m.l + w, y1: m.t + h, y2: m.t + h }));

    const clip = `clip-${box.id}`;
    const defs = svgEl("defs");
    const clipPath = svgEl("clipPath", { id: clip });
    clipPath.append(svgEl("rect", { x: m.l, y: 0, width: w, height: m.t + h + 1 }));
    defs.append(clipPath);
    svg.append(defs);
    const plot = svgEl("g", { "clip-path": `url(#${clip})` });
    svg.append(plot);

    for (const s of series) {
      for (const run of runsOf(s.points)) {
        const d = stepPath(run, x, y);
        if (s.area) {
          const first = run[0];
          const last = run[run.length - 1];
          const area = `${d} L${x(last[0]).toFixed(1)},${y(0)} L${x(first[0]).toFixed(1)},${y(0)} Z`;
          plot.append(svgEl("path", { class: `area ${s.cls}`, d: area }));
        }
        plot.append(svgEl("path", { class: `line ${s.cls}`, d }));
      }
    }

    for (const ev of events) {
      const way = ev.to > ev.from ? "up" : ev.to < ev.from ? "down" : "same";
      const xx = x(ev.time);
      const g = svgEl("g", { class: `ev ${way}` });
      g.append(svgEl("line", { class: "ev-line", x1: xx, x2: xx, y1: m.t, y2: m.t + h }));
      if (way === "same") {
        g.append(svgEl("circle", { cx: xx, cy: m.t + 3, r: 3.5 }));
      } else {
        const tri = way === "up"
          ? `M${xx - 5},${m.t + 7} L${xx + 5},${m.t + 7} L${xx},${m.t - 1} Z`
          : `M${xx - 5},${m.t - 1} L${xx + 5},${m.t - 1} L${xx},${m.t + 7} Z`;
        g.append(svgEl("path", { d: tri }));
      }
      g.append(svgEl("title", {}, `${clock(ev.time)} ${ev.pool}: ${ev.from} → ${ev.to}: ${ev.reason}`));
      plot.append(g);
    }

    if (!state.samples.length) {
      svg.append(svgEl("text", { class: "nodata", x: m.l + w / 2, y: m.t + h / 2,
        "text-anchor": "middle" }, "Waiting for data…"));
    }
    box.replaceChildren(svg);
  }

  function runsOf(points) {
    const runs = [];
    let run = [];
    let prevT = null;
    for (const p of points) {
      if (p[1] === null || (prevT !== null && p[0] - prevT > GAP_S)) {
        if (run.length) runs.push(run);
        run = [];
      }
      if (p[1] !== null) run.push(p);
      prevT = p[0];
    }
    if (run.length) runs.push(run);
    return runs;
  }

  function stepPath(run, x, y) {
    let d = `M${x(run[0][0]).toFixed(1)},${y(run[0][1]).toFixed(1)}`;
    for (let i = 1; i < run.length; i++) {
      d += ` H${x(run[i][0]).toFixed(1)} V${y(run[i][1]).toFixed(1)}`;
    }
    return d;
  }

  function renderProcessed() {
    const box = $("chart-processed");
    const rows = [...state.processed.entries()]
      .filter(([, r]) => !state.pool || r.pool === state.pool)
      .sort((a, b) => Number(a[1].gone) - Number(b[1].gone) || b[1].processed - a[1].processed)
      .slice(0, MAX_BARS);
    const width = Math.max(240, box.clientWidth);
    const rowH = 22;
    const height = Math.max(110, rows.length * rowH + 16);
    const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, "aria-hidden": "true" });
    svg.setAttribute("height", String(height));
    if (!rows.length) {
      svg.append(svgEl("text", { class: "nodata", x: width / 2, y: height / 2,
        "text-anchor": "middle" }, "No containers yet."));
      label(box, "No containers yet.");
      box.replaceChildren(svg);
      return;
    }
    const labelW = 170;
    const valueW = 50;
    const w = width - labelW - valueW;
    const max = Math.max(1, ...rows.map(([, r]) => r.processed));
    rows.forEach(([name, r], i) => {
      const yy = 8 + i * rowH;
      const text = `${r.id}${r.gone ? " (gone)" : ""}`;
      svg.append(svgEl("text", { class: "bar-label", x: 0, y: yy + 13 }, text));
      const bw = Math.max(2, (r.processed / max) * w);
      const bar = svgEl("rect", { class: `bar${r.gone ? " gone" : ""}`, x: labelW, y: yy + 2,
        width: bw.toFixed(1), height: rowH - 7, rx: 3 });
      bar.append(svgEl("title", {}, `${name}: ${r.processed} processed`));
      svg.append(bar);
      svg.append(svgEl("text", { class: "bar-value", x: labelW + bw + 6, y: yy + 13 },
        fmt(r.processed)));
    });
    box.style.height = `${height}px`;
    box.replaceChildren(svg);
    label(box, "Requests processed per container: " +
      rows.map(([, r]) => `${r.id}${r.gone ? " (gone)" : ""} ${r.processed}`).join(", ") + ".");
  }

  // -- tables ---------------------------------------------------------------------------

  function renderTables(snap) {
    const workers = snap.workers.filter((w) => !state.pool || w.pool === state.pool);
    const events = [...state.events.values()]
      .filter((e) => !state.pool || e.pool === state.pool)
      .sort((a, b) => b.seq - a.seq);
    // Ages move every tick; rebuild the tables only when something else changed, or every 2 s.
    const key = JSON.stringify([workers, state.lastEventSeq, Math.floor(snap.t / 2)]);
    if (key === state.tablesKey) return;
    state.tablesKey = key;
    renderContainers(workers, snap.t);
    renderEvents(events);
  }

  function renderContainers(workers, now) {
    const body = $("containers").tBodies[0];
    const rows = workers.map((w) => {
      const tr = document.createElement("tr");
      tr.dataset.id = w.id;
      tr.append(cell(w.id, "mono"));
      tr.append(cell(w.name, "mono"));
      tr.append(cell(w.pool));
      tr.append(cell(w.hostPort ?? "–", "num mono"));
      const st = document.createElement("td");
      const badge = el("span", `badge ${w.state}`, w.state);
      st.append(badge);
      if (w.state === "ready" && !w.healthy) st.append(" ", el("span", "badge unhealthy", "unhealthy"));
      tr.append(st);
      const inflight = cell(`${w.inFlight}/${w.concurrency}`, "num");
      const slots = el("span", "slots");
      slots.setAttribute("aria-hidden", "true");
      for (let i = 0; i < Math.min(w.concurrency, 8); i++) {
        slots.append(el("i", i < w.inFlight ? "on" : ""));
      }
      inflight.append(slots);
      tr.append(inflight);
      tr.append(cell(fmt(w.processed), "num"));
      tr.append(cell(fmt(w.failed), "num"));
      tr.append(cell(age(now - w.createdAt), "num"));
      return tr;
    });
    body.replaceChildren(...rows);
    $("containers-empty").hidden = rows.length > 0;
    const ready = workers.filter((w) => w.state === "ready").length;
    $("containers-count").textContent = `${workers.length} total · ${ready} ready`;
  }

  function renderEvents(events) {
    const body = $("events").tBodies[0];
    const rows = events.slice(0, MAX_EVENT_ROWS).map((e) => {
      const tr = document.createElement("tr");
      if (e.seq > state.shownEventSeq) tr.className = "fresh";
      const time = cell(clock(e.time), "num");
      time.title = new Date(e.time * 1000).toString();
      tr.append(time);
      tr.append(cell(e.pool));
      const way = e.to > e.from ? "up" : e.to < e.from ? "down" : "same";
      const mark = { up: "▲", down: "▼", same: "●" }[way];
      const change = cell(`${mark} ${e.from} → ${e.to}`, `change ${way}`);
      const words = { up: "up", down: "down", same: "set" }[way];
      change.setAttribute("aria-label", `${words} from ${e.from} to ${e.to}`);
      tr.append(change);
      tr.append(cell(e.reason));
      return tr;
    });
    state.shownEventSeq = state.lastEventSeq;
    body.replaceChildren(...rows);
    $("events-empty").hidden = rows.length > 0;
    $("events-count").textContent = events.length ? `${events.length} kept` : "";
  }

  function cell(text, className) {
    const td = document.createElement("td");
    if (className) td.className = className;
    td.textContent = String(text);
    return td;
  }

  function age(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
    return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  }

  document.addEventListener("DOMContentLoaded", () => {
    wireControls();
    updatePoolSelect();
    connect();
  });
})();
