// transferlab view: the page over a feature store. Served by transferlab/viewer/webapp.py,
// or inlined into a self-contained report (config.static: data embedded, no server).
// The map is drawn by plotly.js's WebGL scatter (scattergl).
"use strict";
(function () {
  const CFG = JSON.parse(document.getElementById("tl-config").textContent);
  const STATIC = !!CFG.static;
  const MAX_TRACES = 40;      // one trace (legend entry) per class or cluster up to this
  const GRID_LIMIT = 200;     // tiles of a selection
  const PLACEHOLDER = "data:image/svg+xml;utf8," + encodeURIComponent(
    '<svg xmlns="http://www.w3.org/2000/svg" width="160" height="160"><rect width="160" ' +
    'height="160" fill="#eee" stroke="#bbb"/><text x="80" y="84" font-family="sans-serif" ' +
    'font-size="14" fill="#888" text-anchor="middle">no image</text></svg>');
  const $ = (id) => document.getElementById(id);
  const state = { info: null, x: null, y: null, rows: null, labels: null, clusters: null,
                  mask: null, traces: [] };
  window.TL = state;  // for tests and the curious

  function url(path) {
    if (!CFG.token) return path;
    return path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(CFG.token);
  }
  async function getJSON(path, init) {
    const r = await fetch(url(path), init);
    const body = await r.json().catch(() => ({ error: r.statusText }));
    if (!r.ok) throw new Error(body.error || r.statusText);
    return body;
  }
  function thumbURL(row) {
    if (STATIC) return (CFG.thumbs && CFG.thumbs[row]) || PLACEHOLDER;
    return url("thumb/" + row);
  }
  function b64bytes(text) {
    const bin = atob(text);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out.buffer;
  }

  async function load() {
    state.info = STATIC ? CFG.info : await getJSON("api/info");
    const buf = STATIC ? b64bytes(CFG.map) : await (await fetch(url("api/map.bin"))).arrayBuffer();
    const m = state.info.shown, f = 4 * m;
    state.x = new Float32Array(buf, 0, m);
    state.y = new Float32Array(buf, f, m);
    state.rows = new Int32Array(buf, 2 * f, m);
    state.labels = new Int32Array(buf, 3 * f, m);
    state.clusters = new Int32Array(buf, 4 * f, m);
    state.mask = new Uint8Array(m).fill(1);
    setupControls();
    draw();
  }

  function setupControls() {
    const info = state.info;
    $("store-name").textContent = info.store + " (" + info.rows.toLocaleString() + " rows, " +
      info.dim + " dims, " + info.method.toUpperCase() + ")";
    const notes = [];
    if (info.sampled) {
      notes.push("showing a seeded random sample of " + info.shown.toLocaleString() + " of " +
                 info.rows.toLocaleString() + " points");
    }
    if (!STATIC && info.cache === false) notes.push("read-only store: nothing cached");
    $("sample-note").textContent = notes.join("; ");
    const colour = $("colour-by");
    const opts = [["none", "nothing"]];
    if (info.labelled) opts.unshift(["class", "class"]);
    if (info.cluster_counts) opts.splice(opts.length - 1, 0, ["cluster", "cluster"]);
    for (const [v, t] of opts) colour.add(new Option(t, v));
    colour.onchange = draw;
    const fc = $("filter-class");
    info.class_names.forEach((n, c) => fc.add(new Option(n + " (" + info.class_counts[c] + ")", c)));
    fc.disabled = !info.labelled;
    fc.onchange = applyFilters;
    const fk = $("filter-cluster");
    (info.cluster_counts || []).forEach((n, c) => fk.add(new Option(c + " (" + n + ")", c)));
    fk.disabled = !info.cluster_counts;
    fk.onchange = applyFilters;
    const fp = $("filter-prefix");
    if (STATIC) { fp.disabled = true; fp.placeholder = "needs the server"; }
    let timer = null;
    fp.oninput = () => { clearTimeout(timer); timer = setTimeout(applyFilters, 250); };
    // per-class counts
    const table = $("class-counts");
    if (info.labelled) {
      info.class_names.forEach((n, c) => {
        const tr = table.insertRow();
        tr.insertCell().textContent = n;
        const td = tr.insertCell(); td.className = "n"; td.textContent = info.class_counts[c];
      });
      if (info.unlabelled) {
        const tr = table.insertRow();
        tr.insertCell().textContent = "(unlabelled)";
        tr.insertCell().textContent = info.unlabelled;
      }
    } else {
      $("counts-section").style.display = "none";
    }
    showConfusion(info.confusion);
    // galleries
    const gb = $("gallery-buttons");
    const names = Object.keys(info.galleries || {});
    if (!names.length) gb.textContent = "none (run transferlab curate STORE)";
    for (const name of names) {
      const g = info.galleries[name];
      const b = document.createElement("button");
      b.id = "gallery-" + name;
      b.textContent = name.replace("_", " ") + " (" + g.total + ")";
      b.onclick = () => showGallery(name);
      gb.appendChild(b);
    }
    // query by image
    if (STATIC || !info.can_query) {
      $("drop").textContent = STATIC ? "needs the server (transferlab view STORE)"
        : info.cache === false ? "needs a writable store (the upload is held in its view-cache)"
        : "this store records no model to embed a query with";
    } else {
      const drop = $("drop");
      drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
      drop.ondragleave = () => drop.classList.remove("over");
      drop.ondrop = (e) => {
        e.preventDefault(); drop.classList.remove("over");
        if (e.dataTransfer.files.length) queryImage(e.dataTransfer.files[0]);
      };
      $("upload").onchange = (e) => { if (e.target.files.length) queryImage(e.target.files[0]); };
    }
  }

  function showConfusion(conf) {
    // rows: true class, columns: predicted; a table up to 20 classes, else the most confused
    const box = $("confusion");
    if (!conf) { $("confusion-section").style.display = "none"; return; }
    $("confusion-note").textContent = conf.held_out ? "(" + conf.held_out + ")" : "";
    const n = conf.classes.length, m = conf.matrix;
    if (n <= 20) {
      const table = document.createElement("table");
      const head = table.insertRow();
      head.appendChild(document.createElement("th")).textContent = "true\\pred";
      conf.classes.forEach((c) => { head.appendChild(document.createElement("th")).textContent = c; });
      m.forEach((row, i) => {
        const tr = table.insertRow();
        tr.appendChild(document.createElement("th")).textContent = conf.classes[i];
        const total = row.reduce((a, b) => a + b, 0) || 1;
        row.forEach((v, j) => {
          const td = tr.insertCell(); td.textContent = v;
          const share = v / total;
          td.style.background = i === j ? "rgba(40,160,90," + share + ")" : "rgba(220,60,60," + Math.min(1, 3 * share) + ")";
        });
      });
      box.appendChild(table);
    } else {
      const pairs = [];
      m.forEach((row, i) => row.forEach((v, j) => { if (i !== j && v > 0) pairs.push([v, i, j]); }));
      pairs.sort((a, b) => b[0] - a[0]);
      const ul = document.createElement("ul");
      for (const [v, i, j] of pairs.slice(0, 12)) {
        ul.appendChild(document.createElement("li")).textContent =
          conf.classes[i] + " as " + conf.classes[j] + ": " + v;
      }
      box.appendChild(ul);
    }
  }

  async function applyFilters() {
    const m = state.info.shown;
    const cls = $("filter-class").value, clu = $("filter-cluster").value;
    const prefix = $("filter-prefix").value;
    let pmask = null;
    if (prefix && !STATIC) {
      const r = await fetch(url("api/prefix.bin?prefix=" + encodeURIComponent(prefix)));
      pmask = new Uint8Array(await r.arrayBuffer());
    }
    for (let i = 0; i < m; i++) {
      state.mask[i] = (cls === "" || state.labels[i] === +cls) &&
        (clu === "" || state.clusters[i] === +clu) && (!pmask || pmask[i]) ? 1 : 0;
    }
    draw();
  }

  function groupsOf(by) {
    const m = state.info.shown;
    const key = by === "class" ? state.labels : by === "cluster" ? state.clusters : null;
    const groups = new Map();
    for (let i = 0; i < m; i++) {
      if (!state.mask[i]) continue;
      const g = key ? key[i] : 0;
      if (!groups.has(g)) groups.set(g, []);
      groups.get(g).push(i);
    }
    return [...groups.entries()].sort((a, b) => a[0] - b[0]);
  }

  function groupName(by, g) {
    if (by === "class") return g < 0 ? "unlabelled" : (state.info.class_names[g] || String(g));
    if (by === "cluster") return g < 0 ? "unassigned" : "cluster " + g;
    return "all";
  }

  function draw() {
    const by = $("colour-by").value;
    const groups = groupsOf(by);
    const size = state.info.shown > 50000 ? 2 : state.info.shown > 5000 ? 3 : 6;
    let traces;
    if (groups.length <= MAX_TRACES) {
      traces = groups.map(([g, idx]) => ({ g, idx: Int32Array.from(idx) }));
    } else {  // many groups: one trace, coloured by number
      const all = [].concat(...groups.map(([, idx]) => idx)).sort((a, b) => a - b);
      traces = [{ g: null, idx: Int32Array.from(all) }];
    }
    state.traces = traces;
    const key = by === "class" ? state.labels : by === "cluster" ? state.clusters : null;
    const data = traces.map((t) => {
      const x = new Float32Array(t.idx.length), y = new Float32Array(t.idx.length);
      t.idx.forEach((p, j) => { x[j] = state.x[p]; y[j] = state.y[p]; });
      const marker = { size: size, opacity: 0.8 };
      if (t.g === null && key) {
        marker.color = Array.from(t.idx, (p) => key[p]); marker.colorscale = "Turbo";
      }
      return { type: "scattergl", mode: "markers", x: x, y: y, marker: marker,
               name: t.g === null ? "all" : groupName(by, t.g), hoverinfo: "none" };
    });
    const plotted = data.reduce((s, d) => s + d.x.length, 0);
    window.TL_POINTS = plotted;
    $("count").dataset.points = plotted;
    $("count").textContent = plotted.toLocaleString() + " points";
    const layout = { margin: { l: 30, r: 10, t: 10, b: 30 }, dragmode: "lasso",
                     hovermode: "closest", showlegend: data.length > 1 && data.length <= MAX_TRACES,
                     legend: { itemsizing: "constant" }, uirevision: "keep" };
    const gd = $("map");
    Plotly.react(gd, data, layout, { responsive: true, displaylogo: false }).then(() => {
      if (!gd._tlBound) bindEvents(gd);
      if (!window.TL_READY) window.TL_READY_AT = performance.now();  // first interactive map
      window.TL_READY = true;
      gd.dataset.ready = "1";
    });
  }

  function rowOf(pt) { return state.rows[state.traces[pt.curveNumber].idx[pt.pointIndex]]; }

  function bindEvents(gd) {
    gd._tlBound = true;
    gd.on("plotly_hover", (e) => {
      const row = rowOf(e.points[0]);
      $("hover").style.display = "block";
      $("hover").dataset.row = row;
      $("hover-img").src = thumbURL(row);
      $("hover-text").textContent = describe(row);
    });
    gd.on("plotly_unhover", () => { $("hover").style.display = "none"; });
    gd.on("plotly_click", (e) => { if (e.points.length) showNeighbours(rowOf(e.points[0])); });
    gd.on("plotly_selected", (e) => {
      if (!e || !e.points) return;
      const rows = e.points.map(rowOf);
      showTiles("selection: " + rows.length + " points" +
                (rows.length > GRID_LIMIT ? " (first " + GRID_LIMIT + " shown)" : ""),
                rows.slice(0, GRID_LIMIT).map((r) => ({ row: r, caption: "" })));
    });
  }

  const known = new Map();  // row -> its point record (key, class), fetched on hover
  function describe(row) {
    if (STATIC) { const p = (CFG.points || {})[row]; return p ? p.key : "row " + row; }
    const p = known.get(row);
    if (p) return p.key + (p.class ? " (" + p.class + ")" : "");
    getJSON("api/point/" + row).then((q) => {
      known.set(row, q);
      if ($("hover").dataset.row === String(row)) $("hover-text").textContent = describe(row);
    }).catch(() => {});
    return "row " + row;
  }

  function tile(item, cls) {
    const d = document.createElement("div");
    d.className = "tile" + (cls ? " " + cls : "");
    d.dataset.row = item.row;
    const img = document.createElement("img");
    img.loading = "lazy"; img.src = thumbURL(item.row); img.alt = item.key || "";
    d.appendChild(img);
    const key = document.createElement("div");
    key.className = "key"; key.textContent = item.key || describe(item.row); key.title = key.textContent;
    d.appendChild(key);
    if (item.caption) {
      const c = document.createElement("div"); c.textContent = item.caption; d.appendChild(c);
    }
    if (!STATIC) d.onclick = () => showNeighbours(item.row);
    return d;
  }

  function showTiles(title, items, first) {
    $("results-title").textContent = title;
    const grid = $("results-grid");
    grid.replaceChildren();
    if (first) grid.appendChild(tile(first, "query"));
    for (const it of items) grid.appendChild(tile(it));
    grid.dataset.count = items.length;
  }

  function showError(text) {
    $("results-title").textContent = text;
    $("results-title").className = "error";
    $("results-grid").replaceChildren();
    $("results-grid").dataset.count = 0;
  }

  async function showNeighbours(row) {
    $("results-title").className = "";
    if (STATIC) {
      const p = (CFG.points || {})[row];
      showTiles("point " + (p ? p.key : row) + " (nearest images need the server)", [],
                { row: row, key: p && p.key });
      return;
    }
    try {
      const r = await getJSON("api/neighbours/" + row + "?k=12");
      showTiles("nearest images of " + r.query.key,
                r.hits.map((h) => ({ row: h.row, key: h.key,
                                     caption: h.distance.toFixed(4) + (h.class ? " " + h.class : "") })),
                { row: row, key: r.query.key, caption: "query" + (r.query.class ? " " + r.query.class : "") });
    } catch (err) { showError(String(err.message || err)); }
  }

  async function queryImage(file) {
    $("results-title").className = "";
    $("results-title").textContent = "embedding " + file.name + " ...";
    try {
      const r = await getJSON("api/query?k=12", { method: "POST", body: file,
        headers: { "Content-Type": file.type || "application/octet-stream" } });
      showTiles("nearest images of the uploaded " + file.name,
                r.hits.map((h) => ({ row: h.row, key: h.key,
                                     caption: h.distance.toFixed(4) + (h.class ? " " + h.class : "") })));
    } catch (err) { showError("query failed: " + String(err.message || err)); }
  }

  async function showGallery(name) {
    $("results-title").className = "";
    try {
      const g = STATIC ? CFG.galleries[name] : await getJSON("api/gallery/" + name);
      const more = g.total > g.items.length ? " (first " + g.items.length + " of " + g.total + ")" : "";
      showTiles(g.title + more, g.items);
      $("results-grid").dataset.gallery = name;
    } catch (err) { showError(String(err.message || err)); }
  }

  load().catch((err) => { document.body.dataset.error = String(err); showError(String(err)); });
})();
