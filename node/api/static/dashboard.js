/* The IT dashboard of a sononode. Everything it shows is fetched from this node with the
 * reader's bearer token (GET /dashboard/data, /drift, /drift/{vendor}); the HTML holds no
 * data. The token comes from the address (#token=..., then removed from it) or the form,
 * and is kept in this tab's sessionStorage. Text from the index (vendor names come from
 * DICOM headers) is only ever set as textContent, never parsed as HTML. */
(function () {
  "use strict";

  const TOKEN_KEY = "sononode.dashboard.token";
  const REFRESH_MS = 30000;
  /* Okabe-Ito: distinguishable with the common colour-vision deficiencies. */
  const STREAM_COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00",
    "#000000", "#999999"];
  const LABEL_COLOURS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948",
    "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
  const RATE_SERIES = [
    { key: "needs_review", label: "needs review", colour: "#0072B2" },
    { key: "qc_fail", label: "QC fail", colour: "#D55E00" },
    { key: "ood", label: "OOD", colour: "#CC79A7" },
  ];
  const STATUS_ORDER = { alert: 0, warming: 1, ok: 2 };

  const $ = (id) => document.getElementById(id);
  let token = null;
  let timer = null;
  let charts = [];
  let volumeMeasure = "images";
  let lastData = null;
  let driftStreams = [];
  let selectedStream = null;
  let colourOf = new Map();

  class HttpError extends Error {
    constructor(status, detail) {
      super("HTTP " + status + (detail ? ": " + detail : ""));
      this.status = status;
    }
  }

  /* ---------------------------------------------------------------- DOM helpers */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "style") Object.assign(node.style, value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function replace(container, ...children) {
    container.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined));
  }

  function pct(part, whole) {
    if (part === null || part === undefined || !whole) return "–";
    return (100 * part / whole).toFixed(1) + " %";
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 90) return Math.round(seconds) + " s";
    if (seconds < 5400) return Math.round(seconds / 60) + " min";
    if (seconds < 172800) return Math.round(seconds / 3600) + " h";
    return Math.round(seconds / 86400) + " d";
  }

  function ago(iso) {
    if (!iso) return "–";
    return duration(Math.max(0, (Date.now() - Date.parse(iso)) / 1000)) + " ago";
  }

  function epoch(iso) {
    return Date.parse(iso) / 1000;
  }

  function vendorKey(vendor) {
    return String(vendor || "").trim().toLowerCase();
  }

  function streamColour(vendor) {
    const key = vendorKey(vendor);
    if (!colourOf.has(key)) colourOf.set(key, STREAM_COLOURS[colourOf.size % STREAM_COLOURS.length]);
    return colourOf.get(key);
  }

  function badge(status) {
    const known = Object.prototype.hasOwnProperty.call(STATUS_ORDER, status);
    return el("span", { class: "badge " + (known ? status : "unknown"), text: status || "unknown" });
  }

  /* ---------------------------------------------------------------- token */
  function takeToken() {
    const fragment = new URLSearchParams(location.hash.replace(/^#/, ""));
    const given = fragment.get("token");
    if (given) {
      sessionStorage.setItem(TOKEN_KEY, given);
      history.replaceState(null, "", location.pathname + location.search);
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function showAuth(message) {
    stopTimer();
    $("auth-message").textContent = message ||
      "The dashboard reads the node's API with a reader or admin token.";
    $("auth").hidden = false;
    $("content").hidden = true;
    $("banner").hidden = true;
    document.body.dataset.state = "auth";
    $("auth-token").focus();
  }

  function forgetToken() {
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
  }

  /* ---------------------------------------------------------------- fetching */
  async function api(path) {
    const response = await fetch(path, {
      headers: { Authorization: "Bearer " + token, Accept: "application/json" },
      cache: "no-store",
    });
    if (!response.ok) {
      let detail = response.statusText;
      try {
        const body = await response.json();
        detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      } catch (_) { /* not JSON: keep the status text */ }
      throw new HttpError(response.status, detail);
    }
    return response.json();
  }

  function isAuthError(error) {
    return error instanceof HttpError && (error.status === 401 || error.status === 403);
  }

  async function refresh() {
    stopTimer();
    if (!token) {
      showAuth();
      return;
    }
    try {
      const data = await api("/dashboard/data?window=" + encodeURIComponent($("window").value));
      let drift = null;
      let driftError = null;
      try {
        drift = await api("/drift");
      } catch (error) {
        if (isAuthError(error)) throw error;
        driftError = error;
      }
      lastData = data;
      $("auth").hidden = true;
      $("content").hidden = false;
      $("banner").hidden = true;
      render(data, drift, driftError);
      await renderSignals().catch((error) => {
        if (isAuthError(error)) throw error;
        replace($("signals"), el("p", { class: "empty",
          text: "Drift history could not be read: " + error.message }));
      });
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
      document.body.dataset.state = "ready";
    } catch (error) {
      if (error instanceof HttpError && error.status === 401) {
        forgetToken();
        showAuth("This token was not accepted (401 Unauthorized). Enter a valid API token.");
        return;
      }
      if (error instanceof HttpError && error.status === 403) {
        forgetToken();
        showAuth("This token may not read the dashboard (403 Forbidden): use a reader or " +
          "admin token.");
        return;
      }
      const banner = $("banner");
      banner.textContent = "Could not refresh: " + error.message +
        (lastData ? ". The figures below are from " + $("updated").textContent.replace("updated ", "") + "." : ".") +
        " Retrying every 30 s.";
      banner.hidden = false;
      if (!lastData) document.body.dataset.state = "error";
    }
    timer = setTimeout(refresh, REFRESH_MS);
  }

  function stopTimer() {
    if (timer !== null) clearTimeout(timer);
    timer = null;
  }

  /* ---------------------------------------------------------------- charts */
  function destroyCharts() {
    for (const { chart } of charts) chart.destroy();
    charts = [];
  }

  function chart(container, options, data) {
    const width = Math.max(240, container.clientWidth);
    const plot = new uPlot(Object.assign({ width: width }, options), data, container);
    charts.push({ chart: plot, container: container });
    return plot;
  }

  /* Half a bucket of room on either side, so that the first and last bars and points show whole. */
  function padX(seconds) {
    return (_u, min, max) => [min - seconds / 2, max + seconds / 2];
  }

  function bucketSeconds(data) {
    return data.bucket === "hour" ? 3600 : 86400;
  }

  function plural(n, one, many) {
    return n === 1 ? one : many;
  }

  function yFromZero(_u, _min, max) {
    return [0, Math.max(1, max)];
  }

  function timeAxes(yLabel) {
    return [
      { stroke: "#5b6877", grid: { stroke: "#eceff3" }, ticks: { stroke: "#d9dfe6" } },
      { label: yLabel, stroke: "#5b6877", size: 52, grid: { stroke: "#eceff3" },
        ticks: { stroke: "#d9dfe6" } },
    ];
  }

  window.addEventListener("resize", () => {
    for (const { chart: plot, container } of charts) {
      plot.setSize({ width: Math.max(240, container.clientWidth), height: plot.height });
    }
  });

  /* ---------------------------------------------------------------- rendering */
  function streamName(stream) {
    return stream.model ? stream.vendor + " · " + stream.model : stream.vendor;
  }

  function render(data, drift, driftError) {
    destroyCharts();
    colourOf = new Map();
    for (const stream of data.streams) streamColour(stream.vendor);
    $("node-name").textContent = "AE " + data.node + " · " + data.version;
    const unit = data.bucket === "hour" ? "per hour" : "per day";
    $("volume-unit").textContent = unit;
    $("streams-window").textContent = "last " + $("window").selectedOptions[0].textContent;
    driftStreams = drift && Array.isArray(drift.streams) ? drift.streams : [];
    renderTiles(data, drift);
    renderVolume(data);
    renderDrift(drift, driftError);
    renderStreams(data);
    renderRates(data);
    renderExports(data.exports);
    renderWorkers(data);
  }

  function tile(label, value, detail, level) {
    return el("div", { class: "tile " + (level || "") },
      el("div", { class: "label", text: label }),
      el("div", { class: "value", text: value }),
      el("div", { class: "detail", text: detail || "" }));
  }

  function renderTiles(data, drift) {
    const total = (key) => data.streams.reduce((sum, s) => sum + (s[key] || 0), 0);
    const images = total("images");
    const failing = Object.entries(data.readiness.checks).filter(([, v]) => v !== "ok");
    const able = data.workers.filter((w) => w.can_analyse).length;
    const backlog = data.exports.by_state.pending + data.exports.by_state.retrying;
    const dead = data.exports.by_state.dead;
    const streams = drift && Array.isArray(drift.streams) ? drift.streams : null;
    const alerts = streams ? streams.filter((s) => s.status === "alert").length : 0;
    const warming = streams ? streams.filter((s) => s.status === "warming").length : 0;
    const oodKnown = data.streams.some((s) => s.ood !== null);
    const oldest = data.exports.oldest_pending_age_seconds;
    replace($("tiles"),
      tile("Readiness", data.readiness.ready ? "Ready" : "Not ready",
        failing.length ? failing.map(([k]) => k).join(", ") + " failing" : "all checks ok",
        data.readiness.ready ? "ok" : "alert"),
      tile("Workers", String(data.workers.length) + " live", able + " can analyse",
        able ? "ok" : "alert"),
      tile("Images", images.toLocaleString(), total("studies").toLocaleString() + " " +
        plural(total("studies"), "study", "studies")),
      tile("Needs review", pct(total("needs_review"), images), total("needs_review") + " " +
        plural(total("needs_review"), "image", "images")),
      tile("QC fail · OOD", pct(total("qc_fail"), images),
        "OOD " + (oodKnown ? pct(total("ood"), images) : "–")),
      tile("Drift", streams ? (alerts ? alerts + " alert" + (alerts > 1 ? "s" : "") : "no alert") : "–",
        streams ? streams.length + " streams" + (warming ? ", " + warming + " warming" : "") : "not available",
        streams ? (alerts ? "alert" : "ok") : ""),
      tile("Export backlog", String(backlog), oldest !== null ? "oldest " + duration(oldest) : "none waiting",
        oldest !== null && oldest > 600 ? "warn" : "ok"),
      tile("Dead letters", String(dead), dead ? "see Exports below" : "none",
        dead ? "alert" : "ok"));
  }

  function renderVolume(data) {
    const container = $("volume-chart");
    replace(container);
    if (!data.streams.length) {
      replace(container, el("p", { class: "empty", text: "No image analysed in this window." }));
      return;
    }
    /* Stacked bars: each stream's bar is drawn from zero to the running total of the streams
     * below it, the tallest first, so that each visible segment is one stream's count. */
    const xs = data.bucket_starts.map(epoch);
    const index = new Map(data.bucket_starts.map((iso, i) => [epoch(iso), i]));
    const own = data.streams.map((stream) => {
      const values = new Array(xs.length).fill(0);
      for (const bucket of stream.buckets) {
        const i = index.get(epoch(bucket.start));
        if (i !== undefined) values[i] = bucket[volumeMeasure];
      }
      return values;
    });
    const running = own.map((_, k) => xs.map((__, i) => own.slice(0, k + 1).reduce((sum, v) => sum + v[i], 0)));
    const bars = uPlot.paths.bars({ size: [0.85, 24], gap: 1 });
    const series = [{}];
    const columns = [xs];
    for (let k = data.streams.length - 1; k >= 0; k--) {
      const colour = streamColour(data.streams[k].vendor);
      series.push({ label: streamName(data.streams[k]), stroke: colour, fill: colour, width: 0,
        paths: bars, points: { show: false },
        value: (_u, _v, _si, i) => (i === null || i === undefined ? "–" : String(own[k][i])) });
      columns.push(running[k]);
    }
    const head = el("div", { class: "signals-head" },
      el("label", {}, "Show ", measureSelect()),
      el("span", { class: "muted", text: "stacked by vendor and model" }));
    container.append(head);
    const area = el("div");
    container.append(area);
    chart(area, { height: 290, scales: { x: { time: true, range: padX(bucketSeconds(data)) }, y: { range: yFromZero } },
      axes: timeAxes(volumeMeasure), series: series }, columns);
  }

  function measureSelect() {
    const select = el("select", { "aria-label": "measure" },
      el("option", { value: "images", text: "images" }),
      el("option", { value: "studies", text: "studies" }));
    select.value = volumeMeasure;
    select.addEventListener("change", () => {
      volumeMeasure = select.value;
      if (lastData) {
        for (const { chart: plot, container } of charts.filter((c) => $("volume-chart").contains(c.container))) {
          plot.destroy();
          charts = charts.filter((c) => c.container !== container);
        }
        renderVolume(lastData);
      }
    });
    return select;
  }

  function signalBars(signals) {
    if (!signals || !signals.length) return null;
    const top = Math.max(2, ...signals.map((s) => s.score || 0));
    const rows = [];
    for (const signal of signals) {
      const width = Math.min(100, 100 * (signal.score || 0) / top);
      const arrow = signal.direction === "up" ? " ↑" : signal.direction === "down" ? " ↓" : "";
      rows.push(
        el("span", { title: signal.description || "", text: signal.name + arrow }),
        el("div", { class: "track", title: signal.description || "" },
          el("div", { class: "fill" + (signal.alarming ? " alarming" : ""), style: { width: width + "%" } }),
          el("div", { class: "limit", style: { left: (100 / top) + "%" } })),
        el("span", { class: "num", text: (signal.score || 0).toFixed(2) }));
    }
    return el("div", { class: "signal-bars", "aria-label": "signal scores; 1 is the alarm threshold" }, rows);
  }

  /* vendor_as_sent is "Manufacturer / Model Name" as the scanner wrote them. */
  function driftName(stream) {
    return stream.vendor_as_sent || [stream.vendor, stream.scanner].filter(Boolean).join(" · ");
  }

  function expectedAccuracy(heads) {
    const entries = Object.entries(heads || {});
    if (!entries.length) return null;
    return el("div", { class: "sub", title: "mean calibrated confidence: the accuracy to expect while calibration holds" },
      "expected accuracy: " + entries.map(([head, a]) => head.replace(/_/g, " ") + " " +
        (100 * a.recent).toFixed(0) + " %" +
        (typeof a.reference === "number" ? " (reference " + (100 * a.reference).toFixed(0) + " %)" : "")).join(", "));
  }

  function renderDrift(drift, driftError) {
    const container = $("drift");
    if (driftError) {
      replace(container, el("p", { class: "empty", text: "Drift could not be read: " + driftError.message }));
      return;
    }
    if (!drift || !Array.isArray(drift.streams)) {
      replace(container, el("p", { class: "empty",
        text: "This node's GET /drift does not report drift per stream." }));
      return;
    }
    if (!drift.streams.length) {
      replace(container, el("p", { class: "empty", text: "No stream monitored yet." }));
      return;
    }
    const streams = [...drift.streams].sort((a, b) =>
      (STATUS_ORDER[a.status] ?? 3) - (STATUS_ORDER[b.status] ?? 3) ||
      a.vendor.localeCompare(b.vendor) || a.scanner.localeCompare(b.scanner));
    const items = streams.map((s) => el("div", { class: "drift-item" },
      el("div", { class: "head" },
        el("span", { class: "name" },
          el("span", { class: "swatch", style: { background: streamColour(s.vendor) } }),
          driftName(s)),
        badge(s.status)),
      el("div", { class: "sub", text: s.model + " · " + s.studies + " " + plural(s.studies, "study", "studies") +
        ", " + s.images + " " + plural(s.images, "image", "images") + " · last study " + ago(s.last_study_at) }),
      s.reference ? el("div", { class: "sub", text: "compared with " + s.reference }) : null,
      s.reasons && s.reasons.length ? el("ul", {}, s.reasons.map((r) => el("li", { text: r }))) : null,
      signalBars(s.signals),
      expectedAccuracy(s.expected_accuracy)));
    const note = el("details", { class: "method" },
      el("summary", { text: "How drift is judged" + (typeof drift.false_alarm_target_per_1000_studies === "number"
        ? " (at most " + drift.false_alarm_target_per_1000_studies + " false alarms per 1000 studies)" : "") }),
      drift.method ? el("p", { text: drift.method }) : null);
    replace(container, el("div", { class: "drift-list" }, items), note);
  }

  function mixBar(counts, labelColours) {
    const entries = Object.entries(counts || {});
    const sum = entries.reduce((acc, [, n]) => acc + n, 0);
    if (!sum) return el("span", { class: "muted", text: "–" });
    entries.sort((a, b) => b[1] - a[1]);
    const bar = el("div", { class: "mix", role: "img",
      "aria-label": entries.map(([k, n]) => k + " " + pct(n, sum)).join(", ") },
    entries.map(([label, n]) => el("span", { title: label + ": " + n + " (" + pct(n, sum) + ")",
      style: { width: (100 * n / sum) + "%", background: labelColours.get(label) } })));
    const legend = el("div", { class: "mix-legend" }, entries.slice(0, 4).map(([label, n]) => [
      el("i", { style: { background: labelColours.get(label) } }),
      label.replace(/_/g, " ") + " " + Math.round(100 * n / sum) + "%"]),
    entries.length > 4 ? " …" : "");
    return [bar, legend];
  }

  function labelPalette(streams, key) {
    const labels = [...new Set(streams.flatMap((s) => Object.keys(s[key] || {})))].sort();
    return new Map(labels.map((label, i) => [label, LABEL_COLOURS[i % LABEL_COLOURS.length]]));
  }

  function renderStreams(data) {
    const container = $("streams");
    if (!data.streams.length) {
      replace(container, el("p", { class: "empty", text: "No image analysed in this window." }),
        missingVendors(data));
      return;
    }
    const views = labelPalette(data.streams, "views");
    const findings = labelPalette(data.streams, "findings");
    const head = el("tr", {}, ["Vendor", "Model packs"].map((t) => el("th", { text: t })),
      ["Images", "Studies", "Needs review", "QC fail", "OOD"].map((t) => el("th", { class: "num", text: t })),
      el("th", { text: "Views" }), el("th", { text: "Findings" }), el("th", { text: "Last image" }));
    const rows = data.streams.map((s) => el("tr", {},
      el("td", {}, el("span", { class: "swatch", style: { background: streamColour(s.vendor) } }), s.vendor),
      el("td", { text: s.model || "–" }),
      el("td", { class: "num", text: s.images.toLocaleString() }),
      el("td", { class: "num", text: s.studies.toLocaleString() }),
      el("td", { class: "num", text: pct(s.needs_review, s.images) }),
      el("td", { class: "num", text: pct(s.qc_fail, s.images) }),
      el("td", { class: "num", text: s.ood === null ? "–" : pct(s.ood, s.images),
        title: s.ood_threshold === null ? "no OOD threshold known for these packs"
          : "OOD score above " + s.ood_threshold }),
      el("td", {}, mixBar(s.views, views)),
      el("td", {}, mixBar(s.findings, findings)),
      el("td", { text: ago(s.last_image_at) })));
    replace(container, el("table", {}, el("thead", {}, head), el("tbody", {}, rows)),
      missingVendors(data));
  }

  function missingVendors(data) {
    if (!data.vendors_without_images.length) return null;
    return el("p", { class: "muted", text: "No image in this window from: " +
      data.vendors_without_images.join(", ") });
  }

  /* Hourly rates over a week are mostly noise: the rate charts sum them up per day. */
  function rateBins(data) {
    if (data.bucket !== "hour" || data.bucket_starts.length <= 48) {
      return { starts: data.bucket_starts.map(epoch), of: (iso) => epoch(iso), seconds: bucketSeconds(data),
        unit: data.bucket === "hour" ? "per hour" : "per day" };
    }
    const day = (iso) => Date.parse(iso.slice(0, 10) + "T00:00:00Z") / 1000;
    return { starts: [...new Set(data.bucket_starts.map(day))], of: day, seconds: 86400, unit: "per day" };
  }

  function renderRates(data) {
    const container = $("rates");
    replace(container);
    const bins = rateBins(data);
    $("rates-unit").textContent = bins.unit + ", share of the images analysed";
    if (!data.streams.length) {
      replace(container, el("p", { class: "empty", text: "No image analysed in this window." }));
      return;
    }
    const index = new Map(bins.starts.map((x, i) => [x, i]));
    for (const stream of data.streams) {
      const images = new Array(bins.starts.length).fill(0);
      const counts = Object.fromEntries(RATE_SERIES.map((r) => [r.key, new Array(bins.starts.length).fill(0)]));
      for (const bucket of stream.buckets) {
        const i = index.get(bins.of(bucket.start));
        if (i === undefined) continue;
        images[i] += bucket.images;
        for (const rate of RATE_SERIES) counts[rate.key][i] += bucket[rate.key] || 0;
      }
      const columns = [bins.starts];
      const series = [{}];
      for (const rate of RATE_SERIES) {
        if (rate.key === "ood" && stream.ood === null) continue;
        columns.push(images.map((n, i) => (n ? 100 * counts[rate.key][i] / n : null)));
        series.push({ label: rate.label, stroke: rate.colour, width: 2,
          points: { show: true, size: 5, fill: rate.colour },
          value: (_u, v) => (v === null || v === undefined ? "–" : v.toFixed(1) + " %") });
      }
      const area = el("div");
      container.append(el("div", {},
        el("h3", {}, el("span", { class: "swatch", style: { background: streamColour(stream.vendor) } }),
          streamName(stream)), area));
      chart(area, { height: 170, scales: { x: { time: true, range: padX(bins.seconds) }, y: { range: [0, 100] } },
        axes: timeAxes("%"), series: series }, columns);
    }
  }

  async function renderSignals() {
    const container = $("signals");
    const select = $("signal-stream");
    if (!driftStreams.length) {
      select.replaceChildren();
      select.disabled = true;
      replace(container, el("p", { class: "empty", text: "No drift streams to show." }));
      return;
    }
    const key = (s) => [s.vendor, s.scanner, s.model].join("\u0000");
    const ordered = [...driftStreams].sort((a, b) =>
      (STATUS_ORDER[a.status] ?? 3) - (STATUS_ORDER[b.status] ?? 3) || key(a).localeCompare(key(b)));
    if (!selectedStream || !ordered.some((s) => key(s) === selectedStream)) selectedStream = key(ordered[0]);
    select.disabled = false;
    select.replaceChildren(...ordered.map((s) => el("option", { value: key(s),
      text: driftName(s) + " · " + s.model + " (" + s.status + ")" })));
    select.value = selectedStream;
    const stream = ordered.find((s) => key(s) === selectedStream);
    const detail = await api("/drift/" + encodeURIComponent(stream.vendor));
    const history = (detail.history || []).filter((h) =>
      h.scanner === stream.scanner && h.model === stream.model).sort((a, b) => Date.parse(a.at) - Date.parse(b.at));
    const names = [...new Set(history.flatMap((h) => Object.keys(h.scores || {})))].sort();
    if (history.length < 2 || !names.length) {
      replace(container, el("p", { class: "empty", text: "Not enough drift history for this stream yet (" +
        history.length + " " + plural(history.length, "study", "studies") + " with scores needed: 2)." }));
      return;
    }
    const xs = history.map((h) => epoch(h.at));
    const columns = [xs];
    const series = [{}];
    names.forEach((name, i) => {
      columns.push(history.map((h) => (h.scores && typeof h.scores[name] === "number" ? h.scores[name] : null)));
      const colour = LABEL_COLOURS[i % LABEL_COLOURS.length];
      series.push({ label: name, stroke: colour, width: 2, points: { show: xs.length < 60, size: 4, fill: colour } });
    });
    columns.push(xs.map(() => 1));
    series.push({ label: "alarm threshold", stroke: "#1d2733", width: 1.5, dash: [6, 4], points: { show: false } });
    const area = el("div");
    replace(container, area);
    chart(area, { height: 240, scales: { x: { time: true }, y: { range: yFromZero } },
      axes: timeAxes("score"), series: series }, columns);
  }

  function renderExports(exports) {
    const states = ["pending", "retrying", "sent", "dead"];
    const kv = el("dl", { class: "kv" },
      states.map((state) => [el("dt", { text: state }),
        el("dd", { class: state === "dead" && exports.by_state.dead ? "check-error" : "",
          text: String(exports.by_state[state] ?? 0) })]),
      el("dt", { text: "oldest waiting" }),
      el("dd", { text: exports.oldest_pending_age_seconds === null ? "none"
        : duration(exports.oldest_pending_age_seconds) }));
    let dead = null;
    if (exports.dead_letters.length) {
      dead = el("table", {},
        el("thead", {}, el("tr", {}, ["Export", "Destination", "Attempts", "Last error", "Updated"]
          .map((t) => el("th", { text: t })))),
        el("tbody", {}, exports.dead_letters.map((e) => el("tr", {},
          el("td", { text: "#" + e.id }), el("td", { text: e.destination }),
          el("td", { class: "num", text: String(e.attempts) }),
          el("td", { text: e.last_error || "–" }), el("td", { text: ago(e.updated_at) })))));
    }
    replace($("exports"), kv, dead,
      dead ? el("p", { class: "muted", text: "Replay a dead letter with POST /exports/{id}/replay (admin token)." }) : null);
  }

  function renderWorkers(data) {
    const checks = el("dl", { class: "kv" }, Object.entries(data.readiness.checks).map(([name, value]) => [
      el("dt", { text: name }),
      el("dd", { class: value === "ok" ? "check-ok" : "check-error", text: value })]));
    const workers = data.workers.length
      ? el("table", {},
        el("thead", {}, el("tr", {}, ["Worker", "Queues", "Device", "Can analyse", "Last beat"]
          .map((t) => el("th", { text: t })))),
        el("tbody", {}, data.workers.map((w) => el("tr", {},
          el("td", { text: w.name }), el("td", { text: w.queues }), el("td", { text: w.device || "–" }),
          el("td", { class: w.can_analyse ? "check-ok" : "check-error",
            text: w.can_analyse ? "yes" : "no" + (w.problem ? ": " + w.problem : "") }),
          el("td", { text: ago(w.last_seen) })))))
      : el("p", { class: "empty", text: "No live worker." });
    replace($("workers"), checks, workers);
  }

  /* ---------------------------------------------------------------- wiring */
  function start() {
    const query = new URLSearchParams(location.search);
    const windowSelect = $("window");
    if (query.get("window") && [...windowSelect.options].some((o) => o.value === query.get("window"))) {
      windowSelect.value = query.get("window");
    }
    windowSelect.addEventListener("change", () => {
      const search = new URLSearchParams(location.search);
      search.set("window", windowSelect.value);
      history.replaceState(null, "", location.pathname + "?" + search.toString());
      refresh();
    });
    $("refresh").addEventListener("click", () => refresh());
    $("forget").addEventListener("click", () => {
      forgetToken();
      lastData = null;
      destroyCharts();
      showAuth("Token forgotten.");
    });
    $("signal-stream").addEventListener("change", (event) => {
      selectedStream = event.target.value;
      for (const entry of charts.filter((c) => $("signals").contains(c.container))) entry.chart.destroy();
      charts = charts.filter((c) => !$("signals").contains(c.container));
      renderSignals().catch((error) => {
        replace($("signals"), el("p", { class: "empty", text: "Drift history could not be read: " + error.message }));
      });
    });
    $("auth-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const given = $("auth-token").value.trim();
      if (!given) return;
      sessionStorage.setItem(TOKEN_KEY, given);
      token = given;
      $("auth-token").value = "";
      document.body.dataset.state = "loading";
      refresh();
    });
    token = takeToken();
    refresh();
  }

  start();
})();
