// The latent browser: virtualised table, canvas embedding and latent page over every latent.
// Data arrive as scripts calling BL.table / BL.detail (fetch() of JSON is refused on file://).
// Every string from the data is put into the page with textContent, never parsed as HTML.
(function () {
  "use strict";
  // Detail chunks (d<li>_<c>.js) and gallery chunks (g<li>_<c>.js) arrive the same way.
  var BL = window.BL = { tables: [], chunks: {}, waiting: {} };
  BL.table = function (li, t) { BL.tables[li] = t; };
  function arrive(key, data) {
    BL.chunks[key] = data;
    (BL.waiting[key] || []).forEach(function (f) { f[0](data); });
    delete BL.waiting[key];
  }
  BL.detail = function (li, c, items) { arrive("d" + li + "_" + c, items); };
  BL.gallery = function (li, c, g) { arrive("g" + li + "_" + c, g); };

  var ROW_H = 22, SHIFT = 1048576;  // row id = layer index * SHIFT + latent
  var META, L, Q, ALL_BRANCHES, shown = new Int32Array(0), sortKey = "id", sortDir = 1;
  var el = function (id) { return document.getElementById(id); };

  function h(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function fmt(x, d) {
    if (x === null || x === undefined || (typeof x === "number" && isNaN(x))) { return "—"; }
    if (typeof x !== "number" || Number.isInteger(x)) { return String(x); }
    if (x !== 0 && Math.abs(x) < 1e-3) { return x.toExponential(1); }
    return String(Number(x.toPrecision(d || 3)));
  }
  // Bidi controls in a file name (U+202E reverses what follows) are shown as visible markers,
  // and every name is its own isolated <bdi>, so one name cannot reorder the next.
  var BIDI = /[\u061C\u200E\u200F\u202A-\u202E\u2066-\u2069]/g;
  function visible(s) {
    return String(s).replace(BIDI, function (c) {
      return "\u27E8U+" + ("000" + c.charCodeAt(0).toString(16).toUpperCase()).slice(-4) + "\u27E9";
    });
  }
  function nm(s, cls) { return h("bdi", cls, visible(s)); }
  function names(list, lead) {
    var p = h("p", "note ids", lead || "");
    list.forEach(function (x, i) {
      if (i) { p.appendChild(document.createTextNode(", ")); }
      p.appendChild(nm(x[0]));
      if (x[1]) { p.appendChild(document.createTextNode(" (" + x[1] + ")")); }
    });
    return p;
  }
  // a command to paste into a POSIX shell: each word quoted as Python's shlex.quote does
  function shq(s) {
    s = String(s);
    return /^[A-Za-z0-9_@%+=:,.\/-]+$/.test(s) ? s : "'" + s.replace(/'/g, "'\"'\"'") + "'";
  }
  function color(b) { return META.colors[b] || "#555"; }
  function tag(b) {
    var s = h("span", "tag", b);
    s.style.background = color(b);
    return s;
  }

  // ---- per-row accessors ------------------------------------------------------------------
  function lay(id) { return (id / SHIFT) | 0; }
  function lat(id) { return id % SHIFT; }
  function col(id, name) { var t = BL.tables[lay(id)]; return t[name] ? t[name][lat(id)] : null; }
  function bIndex(li, b) { return L[li].branches.indexOf(b); }
  function minQ(id, pre) {
    var li = lay(id), j = lat(id), t = BL.tables[li], m = null;
    for (var b = 0; b < L[li].branches.length; b++) {
      var v = t[pre + b] ? t[pre + b][j] : null;
      if (v !== null && (m === null || v < m)) { m = v; }
    }
    return m;
  }
  function ratio(id, branch) {
    var li = lay(id), b = bIndex(li, branch);
    return b < 0 ? null : BL.tables[li]["r" + b][lat(id)];
  }
  function domName(id, key) { return L[lay(id)].doms[col(id, key)]; }
  function catName(id) { var c = col(id, "cat"); return c >= 0 ? L[lay(id)].cats[c] : ""; }

  // ---- filters ----------------------------------------------------------------------------
  function searcher(text) {
    var q = text.trim();
    if (!q) { return null; }
    var m = /^(?:([A-Za-z0-9_]+)\s*[:\/#\s-]\s*)?#?(\d+)$/.exec(q);
    if (m) {
      var id = parseInt(m[2], 10), layer = m[1];
      return function (r) { return lat(r) === id && (!layer || L[lay(r)].name === layer); };
    }
    var low = q.toLowerCase();
    return function (r) { return L[lay(r)].name.toLowerCase().indexOf(low) >= 0; };
  }
  function filters() {
    var f = {
      layer: el("f-layer").value, dom: el("f-dom").value, rdom: el("f-rdom").value,
      sigraw: el("f-sigraw").value, sigscale: el("f-sigscale").value,
      rb: el("f-rbranch").value, rmin: parseFloat(el("f-rmin").value) || 0,
      rate: parseFloat(el("f-rate").value) || 0, cat: el("f-cat").value,
      alive: el("f-alive").value, search: searcher(el("f-search").value)
    };
    return function (r) {
      if (f.layer !== "" && lay(r) !== +f.layer) { return false; }
      if (f.dom && domName(r, "dom") !== f.dom) { return false; }
      if (f.rdom && domName(r, "rdom") !== f.rdom) { return false; }
      if (f.sigraw && (col(r, "sr") > 0) !== (f.sigraw === "yes")) { return false; }
      if (f.sigscale && (col(r, "ss") > 0) !== (f.sigscale === "yes")) { return false; }
      if (f.rb && f.rmin > 0) { var v = ratio(r, f.rb); if (v === null || v < f.rmin) { return false; } }
      if (f.rate > 0) { var fr = col(r, "rate"); if (fr === null || fr < f.rate) { return false; } }
      if (f.cat && catName(r) !== f.cat) { return false; }
      if (f.alive && (col(r, "alive") === 1) !== (f.alive === "alive")) { return false; }
      return !f.search || f.search(r);
    };
  }

  // ---- columns ----------------------------------------------------------------------------
  var COLS;
  function columns() {
    var c = [
      { key: "id", label: "layer", w: 76, get: function (r) { return L[lay(r)].name; } },
      { key: "lat", label: "latent", w: 58, num: true, get: lat },
      { key: "dom", label: "dominant", w: 70, get: function (r) { return domName(r, "dom"); }, tag: true },
      { key: "rdom", label: "robust", w: 62, get: function (r) { return domName(r, "rdom"); }, tag: true },
      { key: "qr", label: "min q raw", w: 70, num: true, get: function (r) { return minQ(r, "qr"); } },
      { key: "qs", label: "min q scale", w: 76, num: true, get: function (r) { return minQ(r, "qs"); } }
    ];
    ALL_BRANCHES.forEach(function (b) {
      c.push({ key: "r:" + b, label: "ratio " + b, w: 74, num: true, bar: b,
               get: function (r) { return ratio(r, b); } });
    });
    c.push({ key: "rate", label: "firing rate", w: 74, num: true, get: function (r) { return col(r, "rate"); } });
    c.push({ key: "nimg", label: "images", w: 56, num: true, get: function (r) { return col(r, "nimg"); } });
    c.push({ key: "cat", label: "category", w: 80, get: catName });
    c.push({ key: "img", label: "img", w: 40, get: function (r) {
      return (col(r, "ex") ? "ex" : "") + (col(r, "fv") ? " fv" : ""); } });
    return c;
  }
  function gridTemplate() { return COLS.map(function (c) { return c.w + "px"; }).join(" "); }

  function header() {
    var head = el("thead");
    head.textContent = "";
    head.style.gridTemplateColumns = gridTemplate();
    COLS.forEach(function (c) {
      var cell = h("button", "th", c.label + (sortKey === c.key ? (sortDir > 0 ? " ▲" : " ▼") : ""));
      cell.type = "button";
      cell.dataset.key = c.key;
      cell.addEventListener("click", function () {
        if (sortKey === c.key) { sortDir = -sortDir; } else { sortKey = c.key; sortDir = c.num ? -1 : 1; }
        apply();
      });
      head.appendChild(cell);
    });
  }

  function comparator() {
    if (sortKey === "id") { return function (a, b) { return sortDir * (a - b); }; }
    var c = COLS.filter(function (x) { return x.key === sortKey; })[0];
    return function (a, b) {
      var x = c.get(a), y = c.get(b);
      if (x === y) { return a - b; }
      if (x === null || x === undefined || x === "") { return 1; }  // missing values last
      if (y === null || y === undefined || y === "") { return -1; }
      return sortDir * (x < y ? -1 : 1);
    };
  }

  function apply() {
    var keep = filters(), out = [];
    for (var li = 0; li < L.length; li++) {
      if (!BL.tables[li]) { continue; }
      for (var j = 0; j < L[li].n; j++) {
        var r = li * SHIFT + j;
        if (keep(r)) { out.push(r); }
      }
    }
    out.sort(comparator());
    shown = Int32Array.from(out);
    var total = L.reduce(function (s, l, i) { return s + (BL.tables[i] ? l.n : 0); }, 0);
    el("f-count").textContent = shown.length + " of " + total + " latents";
    el("f-empty").hidden = shown.length > 0;
    el("spacer").style.height = (shown.length * ROW_H) + "px";
    header();
    renderRows(true);
    drawScatter();
  }

  var lastRange = "";
  function renderRows(force) {
    var body = el("tbody"), top = body.scrollTop, hgt = body.clientHeight || 440;
    var first = Math.max(0, Math.floor(top / ROW_H) - 5);
    var last = Math.min(shown.length, Math.ceil((top + hgt) / ROW_H) + 5);
    var range = first + ":" + last;
    if (!force && range === lastRange) { return; }
    lastRange = range;
    var old = body.querySelectorAll(".trow");
    for (var k = 0; k < old.length; k++) { body.removeChild(old[k]); }
    var tpl = gridTemplate();
    for (var i = first; i < last; i++) {
      var r = shown[i], row = h("div", "trow");
      row.style.top = (i * ROW_H) + "px";
      row.style.gridTemplateColumns = tpl;
      row.dataset.id = String(r);
      COLS.forEach(function (c) {
        var v = c.get(r), cell = h("span", c.num ? "td num" : "td");
        if (c.tag && v) { cell.appendChild(tag(v)); }
        else if (c.bar) {
          if (v !== null) {
            var bar = h("i", "mini");
            bar.style.width = Math.round(40 * v) + "px";
            bar.style.background = color(c.bar);
            cell.appendChild(bar);
          }
          cell.appendChild(document.createTextNode(fmt(v, 2)));
        } else { cell.textContent = c.num ? fmt(v) : (v === null ? "" : String(v)); }
        row.appendChild(cell);
      });
      body.appendChild(row);
    }
  }

  // ---- downloads --------------------------------------------------------------------------
  function records() {
    return Array.prototype.map.call(shown, function (r) {
      var o = { layer: L[lay(r)].name, latent: lat(r), alive: col(r, "alive") === 1,
                dominant: domName(r, "dom"), robust_dominant: domName(r, "rdom"),
                min_q_raw: minQ(r, "qr"), min_q_scale: minQ(r, "qs") };
      var li = lay(r), t = BL.tables[li];
      L[li].branches.forEach(function (b, bi) {
        o["paper_ratio_" + b] = t["r" + bi][lat(r)];
        o["q_raw_" + b] = t["qr" + bi][lat(r)];
        o["q_scale_" + b] = t["qs" + bi][lat(r)];
      });
      o.firing_rate = col(r, "rate");
      o.n_images_fired = col(r, "nimg");
      o.top_category = catName(r);
      return o;
    });
  }
  function csvCell(v) {
    var s = v === null || v === undefined ? "" : String(v);
    return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }
  function download(name, text, type) {
    var a = h("a");
    a.href = URL.createObjectURL(new Blob([text], { type: type }));
    a.download = name;
    document.body.appendChild(a);
    a.click();
    setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  }
  function downloadCsv() {
    var rs = records(), keys = {};
    rs.forEach(function (o) { Object.keys(o).forEach(function (k) { keys[k] = 1; }); });
    var head = Object.keys(keys);
    var lines = [head.join(",")].concat(rs.map(function (o) {
      return head.map(function (k) { return csvCell(o[k]); }).join(",");
    }));
    download("latents_shown.csv", lines.join("\n") + "\n", "text/csv");
  }

  // ---- embedding --------------------------------------------------------------------------
  var pts = [], grid = {}, CELL = 12;
  function embLayer() { var v = el("e-layer").value; return v === "" ? -1 : +v; }
  function drawScatter() {
    var cv = el("scatter"); if (!cv) { return; }
    var li = embLayer(), ctx = cv.getContext("2d"), W = 520, dpr = window.devicePixelRatio || 1;
    cv.width = W * dpr; cv.height = W * dpr; cv.style.width = W + "px"; cv.style.height = W + "px";
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, W, W);
    pts = []; grid = {};
    var t = BL.tables[li];
    if (li < 0 || !t || !t.x) {
      ctx.fillStyle = "#8a4b00";
      ctx.fillText(li < 0 ? "no layer with an embedding" :
                   "no embedding for this layer (analysis embed = none)", 12, 20);
      el("e-info").textContent = "";
      return;
    }
    var on = {}, k;
    for (k = 0; k < shown.length; k++) { if (lay(shown[k]) === li) { on[lat(shown[k])] = 1; } }
    var scale = (W - 16) / 1000, nOn = 0;
    ctx.fillStyle = "#d8d8d8";
    for (var j = 0; j < L[li].n; j++) {
      if (t.x[j] < 0 || on[j]) { continue; }
      ctx.fillRect(8 + t.x[j] * scale - 1, 8 + t.y[j] * scale - 1, 2, 2);
    }
    for (j = 0; j < L[li].n; j++) {
      if (t.x[j] < 0 || !on[j]) { continue; }
      var px = 8 + t.x[j] * scale, py = 8 + t.y[j] * scale;
      ctx.fillStyle = color(L[li].doms[t.dom[j]]);
      ctx.fillRect(px - 1.5, py - 1.5, 3, 3);
      var g = ((px / CELL) | 0) + "," + ((py / CELL) | 0);
      (grid[g] = grid[g] || []).push(pts.length);
      pts.push([px, py, j]);
      nOn++;
    }
    el("e-info").textContent = nOn + " shown points (grey: filtered out)";
  }
  function nearest(ev) {
    var cv = el("scatter"), rect = cv.getBoundingClientRect();
    var x = ev.clientX - rect.left, y = ev.clientY - rect.top, best = null, bd = 49;
    var gx = (x / CELL) | 0, gy = (y / CELL) | 0;
    for (var dx = -1; dx <= 1; dx++) {
      for (var dy = -1; dy <= 1; dy++) {
        (grid[(gx + dx) + "," + (gy + dy)] || []).forEach(function (i) {
          var p = pts[i], d = (p[0] - x) * (p[0] - x) + (p[1] - y) * (p[1] - y);
          if (d < bd) { bd = d; best = p; }
        });
      }
    }
    return best;
  }
  function hover(ev) {
    var p = nearest(ev), tip = el("tip"), li = embLayer();
    if (!p) { tip.hidden = true; return; }
    var r = li * SHIFT + p[2];
    tip.textContent = L[li].name + " #" + p[2] + " · " + domName(r, "dom") +
      " · rate " + fmt(col(r, "rate")) + (catName(r) ? " · " + catName(r) : "");
    tip.style.left = (p[0] + 10) + "px"; tip.style.top = (p[1] + 8) + "px";
    tip.hidden = false;
  }

  // ---- latent page ------------------------------------------------------------------------
  function loadChunk(kind, li, c, done, fail) {
    var key = kind + li + "_" + c;
    if (BL.chunks[key]) { done(BL.chunks[key]); return; }
    var first = !BL.waiting[key];
    (BL.waiting[key] = BL.waiting[key] || []).push([done, fail]);
    if (first) {
      var s = document.createElement("script");
      s.src = META.base + "/data/" + key + ".js";
      s.onerror = function () {
        var w = BL.waiting[key] || [];
        delete BL.waiting[key];
        w.forEach(function (f) { f[1](s.src); });
      };
      document.body.appendChild(s);
    }
  }
  function loadDetail(li, j, done) {
    var c = Math.floor(j / L[li].chunk);
    loadChunk("d", li, c, function (items) { done(items[j - c * L[li].chunk]); },
              function (src) { el("latent").textContent = "could not load " + src; });
  }

  // ---- example crops, drawn from the held-out image and the latent's sparse map ------------
  var B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", DIGIT = {};
  for (var q = 0; q < 64; q++) { DIGIT[B64.charAt(q)] = q; }
  var PICS = {};
  function picture(url, ok, bad) {  // each held-out image is fetched once, when first shown
    var p = PICS[url];
    if (!p) {
      p = PICS[url] = { img: new Image(), state: 0, queue: [] };
      p.img.onload = function () { p.state = 1; p.queue.forEach(function (f) { f[0](p.img); }); p.queue = []; };
      p.img.onerror = function () { p.state = 2; p.queue.forEach(function (f) { f[1](); }); p.queue = []; };
      p.img.src = url;
    }
    if (p.state === 1) { ok(p.img); } else if (p.state === 2) { bad(); } else { p.queue.push([ok, bad]); }
  }
  function roundEven(v) {  // Python's round(): the receptive-field box is computed the same way
    var f = Math.floor(v), d = v - f;
    return d > 0.5 ? f + 1 : (d < 0.5 ? f : (f % 2 === 0 ? f : f + 1));
  }
  function rfBox(G, y, x) {  // (top, left, bottom, right) of unit (y, x), clipped to the image
    var size = G.rf[0], half = size / 2, cy = G.rf[2] + G.rf[1] * y, cx = G.rf[2] + G.rf[1] * x;
    return [Math.max(0, roundEven(cy - half + 0.5)), Math.max(0, roundEven(cx - half + 0.5)),
            Math.min(G.image, roundEven(cy + half + 0.5)), Math.min(G.image, roundEven(cx + half + 0.5))];
  }
  function denseMap(G, code) {  // map values in [0, 1] of the latent's best example
    var H = G.grid[0], W = G.grid[1], m = new Float32Array(H * W), step = G.pw + 1;
    for (var k = 0; k + step <= code.length; k += step) {
      var p = 0;
      for (var d = 0; d < G.pw; d++) { p = p * 64 + DIGIT[code.charAt(k + d)]; }
      if (p < H * W) { m[p] = DIGIT[code.charAt(k + G.pw)] / G.levels; }
    }
    return m;
  }
  // The crop: the receptive-field box of the unit (inside the image) fitted into n x n pixels,
  // grey around it. The overlay: the map interpolated bilinearly between unit centres (unit y
  // sits at pixel offset + stride * y), red with opacity alpha * value, inside the image only.
  function fit(G, box, n) {
    var bw = box[3] - box[1], bh = box[2] - box[0], s = n / Math.max(bw, bh);
    var dw = Math.round(bw * s), dh = Math.round(bh * s);
    return { x: Math.floor((n - dw) / 2), y: Math.floor((n - dh) / 2), w: dw, h: dh, sx: dw / bw, sy: dh / bh };
  }
  function heat(G, m, box, f, n) {
    var H = G.grid[0], W = G.grid[1], st = G.rf[1], off = G.rf[2];
    var cv = document.createElement("canvas"); cv.width = cv.height = n;
    var ctx = cv.getContext("2d"), im = ctx.createImageData(n, n), a = im.data;
    for (var v = 0; v < f.h; v++) {
      var uy = Math.min(H - 1, Math.max(0, (box[0] + (v + 0.5) / f.sy - 0.5 - off) / st));
      var y0 = Math.floor(uy), y1 = Math.min(y0 + 1, H - 1), fy = uy - y0;
      for (var u = 0; u < f.w; u++) {
        var ux = Math.min(W - 1, Math.max(0, (box[1] + (u + 0.5) / f.sx - 0.5 - off) / st));
        var x0 = Math.floor(ux), x1 = Math.min(x0 + 1, W - 1), fx = ux - x0;
        var val = (1 - fy) * ((1 - fx) * m[y0 * W + x0] + fx * m[y0 * W + x1]) +
                  fy * ((1 - fx) * m[y1 * W + x0] + fx * m[y1 * W + x1]);
        var i = 4 * ((v + f.y) * n + u + f.x);
        a[i] = G.red[0]; a[i + 1] = G.red[1]; a[i + 2] = G.red[2];
        a[i + 3] = Math.round(255 * G.alpha * Math.min(1, val));
      }
    }
    ctx.putImageData(im, 0, 0);
    return cv;
  }
  function drawCrop(cv, img, G, e, box) {
    var px = META.crop_px, dpr = Math.max(1, Math.round(window.devicePixelRatio || 1)), n = px * dpr;
    cv.width = cv.height = n; cv.style.width = cv.style.height = px + "px";
    var ctx = cv.getContext("2d"), f = fit(G, box, n), k = img ? img.naturalWidth / G.image : 1;
    ctx.fillStyle = "rgb(128,128,128)"; ctx.fillRect(0, 0, n, n);
    if (!img) { return; }
    ctx.imageSmoothingEnabled = true; ctx.imageSmoothingQuality = "high";
    ctx.drawImage(img, box[1] * k, box[0] * k, (box[3] - box[1]) * k, (box[2] - box[0]) * k, f.x, f.y, f.w, f.h);
    ctx.drawImage(heat(G, denseMap(G, e[4]), box, f, n), 0, 0);
  }
  function shortName(id) {
    var s = String(id).split("/").pop().split("#")[0].replace(/\.[^.]*$/, "");
    return s.replace(/^n\d{8}_?/, "").replace(/_/g, " ") || s;
  }
  function drawGallery(box, G, g, row, t0) {
    box.textContent = "";
    if (!row || !row.length) { box.appendChild(h("p", "na small", "no example image could be shown")); return; }
    var done = 0;
    function one() {
      done++;
      if (done === row.length) { box.dataset.drawn = String(done); BL.lastGalleryMs = performance.now() - t0; }
    }
    row.forEach(function (e) {
      var im = g.i[e[0]], fig = h("figure", "crop"), cv = h("canvas"), b = rfBox(G, e[1], e[2]);
      fig.style.width = META.crop_px + "px";
      cv.dataset.unit = e[1] + "," + e[2]; cv.dataset.box = b.join(",");
      cv.setAttribute("role", "img");
      cv.setAttribute("aria-label", visible(im[1]) + ", unit (" + e[1] + ", " + e[2] + ")");
      drawCrop(cv, null, G, e, b);
      fig.appendChild(cv);
      var cap = h("figcaption");
      cap.appendChild(nm(im[2] || shortName(im[1]), "cls"));
      cap.appendChild(h("span", "v", " " + fmt(e[3])));
      fig.appendChild(cap);
      fig.title = visible(im[1]) + (im[2] ? " · " + im[2] : "") + " · unit (" + e[1] + ", " + e[2] + ") · " + fmt(e[3]);
      box.appendChild(fig);
      picture(im[0], function (img) { drawCrop(cv, img, G, e, b); one(); },
              function () { fig.classList.add("broken"); one(); });
    });
  }
  function gallery(right, li, j, t0) {
    var G = L[li].gallery, c = Math.floor(j / G.chunk), box = h("div", "gallery");
    box.appendChild(h("p", "note", "loading examples…"));
    right.appendChild(box);
    loadChunk("g", li, c, function (g) {
      var art = el("latent");
      if (art.dataset.layer !== L[li].name || art.dataset.latent !== String(j)) { return; }  // another latent is open
      drawGallery(box, G, g, g.e[j - c * G.chunk], t0);
    }, function (src) { box.textContent = "could not load " + src; });
  }
  function link(li, j) {
    var a = h("a", "lat", L[li].name + " #" + j);
    a.href = "#latent/" + encodeURIComponent(L[li].name) + "/" + j;
    return a;
  }
  function para(cls, parts) {
    var p = h("p", cls);
    parts.forEach(function (x) { p.appendChild(typeof x === "string" ? document.createTextNode(x) : x); });
    return p;
  }
  function cmd(words) { return h("code", "cmd", words.map(shq).join(" ")); }

  function open(li, j) {
    if (!(li >= 0 && li < L.length) || !(j >= 0 && j < L[li].n) || !BL.tables[li]) { return; }
    var t0 = performance.now(), G = L[li].gallery, none = function () {};
    BL.lastGalleryMs = null;
    if (G && BL.tables[li].ex[j]) { loadChunk("g", li, Math.floor(j / G.chunk), none, none); }  // in parallel
    loadDetail(li, j, function (d) { renderLatent(li, j, d || {}, t0); BL.lastOpenMs = performance.now() - t0; });
  }

  function renderLatent(li, j, d, t0) {
    var r = li * SHIFT + j, art = el("latent"), lay0 = L[li], t = BL.tables[li];
    art.textContent = "";
    art.hidden = false;
    art.dataset.layer = lay0.name; art.dataset.latent = String(j);
    var hd = h("h3", null, lay0.name + " #" + j + " ");
    hd.appendChild(tag(domName(r, "dom")));
    hd.appendChild(document.createTextNode(" robust: "));
    hd.appendChild(tag(domName(r, "rdom")));
    if (catName(r)) { hd.appendChild(h("span", "cat", " " + catName(r))); }
    art.appendChild(hd);
    var close = h("button", "close", "close ✕"); close.type = "button";
    close.addEventListener("click", function () { art.hidden = true; history.replaceState(null, "", "#latents"); });
    art.appendChild(close);
    var m = d.m || {};
    art.appendChild(para("facts", [(t.alive[j] ? "tested" : (d.dead ? "dead in training" : "not tested (never fired on held-out images)")) +
      " · firing rate " + fmt(t.rate[j]) + " · fired on " + fmt(t.nimg[j]) + " images · mean when active " +
      fmt(m.mean_when_active) + " · d_eff " + fmt(m.d_eff) + " · animal " + fmt(m.animal_fraction) + ", dog " + fmt(m.dog_fraction)]));

    var grid2 = h("div", "lgrid"), left = h("div"), right = h("div");
    grid2.appendChild(left); grid2.appendChild(right); art.appendChild(grid2);
    // branch ratios with this latent's channel-permutation null band
    left.appendChild(h("h4", null, "Branch ratio ‖relu(v_b)‖/‖relu(v)‖ and its null band (5–95 %)"));
    var bars = h("div", "bars");
    lay0.branches.forEach(function (b, bi) {
      var v = t["r" + bi][j], row = h("div", "bar"), track = h("span", "track");
      row.appendChild(h("span", "bl", b));
      if (d.band && d.band[bi] && d.band[bi][0] !== null) {
        var band = h("i", "band");
        band.style.left = (100 * d.band[bi][0]) + "%";
        band.style.width = Math.max(0.5, 100 * (d.band[bi][1] - d.band[bi][0])) + "%";
        band.title = "null 5–95 %: " + fmt(d.band[bi][0]) + "–" + fmt(d.band[bi][1]);
        track.appendChild(band);
      }
      if (v !== null) {
        var fill = h("b"); fill.style.width = (100 * v) + "%"; fill.style.background = color(b);
        track.appendChild(fill);
      }
      row.appendChild(track);
      row.appendChild(h("span", "bv", fmt(v, 2) + ((t.sr[j] >> bi) & 1 ? " ★" : "")));
      bars.appendChild(row);
    });
    left.appendChild(bars);
    // p and q on both decision scales
    var tab = h("table", "pq"), tr = h("tr");
    ["branch", "p raw", "q raw", "p scale", "q scale", "enrichment", "attribution"].forEach(function (x) { tr.appendChild(h("th", null, x)); });
    var thead = h("thead"); thead.appendChild(tr); tab.appendChild(thead);
    var tb = h("tbody");
    lay0.branches.forEach(function (b, bi) {
      var row = h("tr"), c0 = h("td"); c0.appendChild(tag(b)); row.appendChild(c0);
      [d.pr, d.qr, d.ps, d.qs, d.en, d.at].forEach(function (a, k) {
        var v = a ? a[bi] : null, bits = k === 1 ? t.sr[j] : (k === 3 ? t.ss[j] : 0);
        var td = h("td", (bits >> bi) & 1 ? "sig" : "", fmt(v));
        row.appendChild(td);
      });
      tb.appendChild(row);
    });
    tab.appendChild(tb); left.appendChild(tab);
    left.appendChild(h("p", "note", "★ / bold: q ≤ " + Q + " (BH per branch). raw: channel-permutation null on the decoder in activation units (the primary decision); scale: permutations only among channels of equal activation std."));

    // feature visualization
    right.appendChild(h("h4", null, "Feature visualization"));
    var fvs = (d.fv || []).filter(function (f) { return f[1]; });
    if (fvs.length) {
      var box = h("div", "fvs");
      fvs.forEach(function (f) {
        var im = h("img"); im.src = f[1]; im.alt = "feature visualization " + lay0.name + " #" + j;
        im.title = f[0]; im.loading = "lazy"; box.appendChild(im);
      });
      right.appendChild(box);
    } else {
      right.appendChild(para("na small", [(d.fv && d.fv.length ? "unreadable image; " : "not rendered; ") + "render it with ",
        cmd(["branchlens", "visualize", META.run, "--layer", lay0.name, "--latents", j])]));
    }
    // top dataset examples: the gallery of every latent, and full-size strips where drawn
    right.appendChild(h("h4", null, "Top held-out examples (receptive-field crops, latent map in red)"));
    var strips = d.strips && d.strips.length;
    if (lay0.gallery) {
      if (t.ex[j]) { gallery(right, li, j, t0); } else { right.appendChild(h("p", "na small", "fired on no held-out image")); }
    } else if (d.ex && !strips) {  // sprite sheets of runs made by earlier versions
      var exs = h("div", "exs");
      for (var k = 0; k < d.ex.k; k++) {
        var tile = h("div", "tile");
        tile.style.width = tile.style.height = d.ex.tile + "px";
        tile.style.backgroundImage = "url(\"" + d.ex.src + "\")";
        tile.style.backgroundPosition = (-k * d.ex.tile) + "px " + (-d.ex.row * d.ex.tile) + "px";
        tile.title = visible(d.ex.ids[k]) + " (" + fmt(d.ex.v[k]) + ")";
        exs.appendChild(tile);
      }
      right.appendChild(exs);
      right.appendChild(names(d.ex.ids.map(function (x) { return [x]; })));
    } else if (!strips) {
      right.appendChild(para("na small", ["no crops; compute them with ",
        cmd(["branchlens", "examples", META.run, "--layer", lay0.name])]));
    }
    if (strips) {  // full-size strips (12 crops of 128 px) of the latents the claims rest on
      d.strips.forEach(function (s) {
        if (!s[1]) { right.appendChild(h("p", "na small", "unreadable strip: " + visible(s[0]))); return; }
        var im = h("img", "strip"); im.src = s[1]; im.alt = "top examples " + lay0.name + " #" + j;
        im.title = visible(s[0]); im.loading = "lazy"; right.appendChild(im);
        right.appendChild(names([[s[0]]]));
      });
    }
    if (d.top && d.top.length) {
      right.appendChild(names(d.top, "top held-out images (analysis): "));
    }
    // what the latent does (effects stage: ablated alone on its top held-out images)
    if (d.eff) {
      right.appendChild(h("p", "effects", "promotes: " + (visible(d.eff[0]) || "nothing above 1e-4")));
      right.appendChild(h("p", "effects", "suppresses: " + (visible(d.eff[1]) || "nothing above 1e-4")));
      right.appendChild(h("p", "note", "Δ class probability when the latent is ablated (α = 0) on its top held-out images, sign flipped: what it adds"));
    } else if (d.eff === 0) {
      right.appendChild(para("na small", ["not ablated by the effects stage (it labels robust latents by default); all of them: ",
        cmd(["branchlens", "effects", META.run, "--layers", lay0.name, "--scope", "all"])]));
    }
    // upstream latents (circuits) and decoder-space neighbours
    var links = h("div", "links");
    var up = h("div"); up.appendChild(h("h4", null, "Upstream latents (circuits)"));
    if (d.up && d.up.length) {
      var ol = h("ol");
      d.up.forEach(function (u) {
        var li2 = -1;
        L.forEach(function (x, i) { if (x.name === u[0]) { li2 = i; } });
        var item = h("li");
        item.appendChild(li2 >= 0 ? link(li2, u[1]) : h("span", null, u[0] + " #" + u[1]));
        if (u[4]) { item.appendChild(document.createTextNode(" ")); item.appendChild(tag(u[4])); }
        item.appendChild(document.createTextNode(" attribution " + fmt(u[2]) + ", share " + fmt(u[3])));
        ol.appendChild(item);
      });
      up.appendChild(ol);
      if (d.err !== null && d.err !== undefined) { up.appendChild(h("p", "note", "SAE error share " + fmt(d.err))); }
    } else {
      up.appendChild(li > 0 ? para("na small", ["not computed for this latent; see ",
        cmd(["branchlens", "circuits", META.run, "--up", L[li - 1].name, "--down", lay0.name, "--latents", j])])
        : h("p", "na small", "not computed (no upstream layer in this run)"));
    }
    var nb = h("div"); nb.appendChild(h("h4", null, "Neighbours in decoder space (cosine)"));
    if (d.nb && d.nb.length) {
      var ul = h("ul", "nbs");
      d.nb.forEach(function (n) {
        var item = h("li"); item.appendChild(link(li, n));
        item.appendChild(document.createTextNode(" ")); item.appendChild(tag(domName(li * SHIFT + n, "dom")));
        ul.appendChild(item);
      });
      nb.appendChild(ul);
    } else { nb.appendChild(h("p", "na small", "no decoder weights in the run (sae/" + lay0.name + ")")); }
    links.appendChild(up); links.appendChild(nb);
    art.appendChild(links);
    art.scrollIntoView({ block: "start" });
  }

  function route() {
    var m = /^#latent\/([^\/]+)\/(\d+)$/.exec(location.hash);
    if (!m) { return; }
    var name = decodeURIComponent(m[1]);
    for (var li = 0; li < L.length; li++) { if (L[li].name === name) { open(li, parseInt(m[2], 10)); } }
  }
  function go(li, j) {
    var hash = "#latent/" + encodeURIComponent(L[li].name) + "/" + j;
    if (location.hash === hash) { open(li, j); } else { location.hash = hash; }
  }

  // ---- start ------------------------------------------------------------------------------
  function options(sel, values, labels) {
    values.forEach(function (v, i) { var o = h("option", null, labels ? labels[i] : v); o.value = v; sel.appendChild(o); });
  }
  function init() {
    var node = el("bl-meta");
    META = JSON.parse(node.textContent);
    L = META.layers; Q = META.q;
    if (!el("tbody") || !L.length) { return; }
    ALL_BRANCHES = [];
    var doms = [], cats = [];
    L.forEach(function (l) {
      l.branches.forEach(function (b) { if (ALL_BRANCHES.indexOf(b) < 0) { ALL_BRANCHES.push(b); } });
      l.doms.forEach(function (b) { if (doms.indexOf(b) < 0) { doms.push(b); } });
      l.cats.forEach(function (c) { if (cats.indexOf(c) < 0) { cats.push(c); } });
    });
    cats.sort();
    var idx = L.map(function (l, i) { return String(i); }), names = L.map(function (l) { return l.name; });
    options(el("f-layer"), idx, names);
    options(el("f-dom"), doms); options(el("f-rdom"), doms); options(el("f-rbranch"), ALL_BRANCHES);
    options(el("f-cat"), cats);
    var withEmb = idx.filter(function (i) { return L[+i].embedding; });
    options(el("e-layer"), withEmb, withEmb.map(function (i) { return L[+i].name; }));
    var legend = el("legend");
    doms.forEach(function (b) { legend.appendChild(tag(b)); legend.appendChild(document.createTextNode(" ")); });
    COLS = columns();
    ["f-layer", "f-dom", "f-rdom", "f-sigraw", "f-sigscale", "f-rbranch", "f-cat", "f-alive"].forEach(function (id) {
      el(id).addEventListener("change", apply);
    });
    ["f-rmin", "f-rate", "f-search"].forEach(function (id) { el(id).addEventListener("input", apply); });
    el("e-layer").addEventListener("change", drawScatter);
    el("tbody").addEventListener("scroll", function () { renderRows(false); });
    el("tbody").addEventListener("click", function (ev) {
      var row = ev.target.closest ? ev.target.closest(".trow") : null;
      if (row) { var r = +row.dataset.id; go(lay(r), lat(r)); }
    });
    var cv = el("scatter");
    cv.addEventListener("mousemove", hover);
    cv.addEventListener("mouseleave", function () { el("tip").hidden = true; });
    cv.addEventListener("click", function (ev) { var p = nearest(ev); if (p) { go(embLayer(), p[2]); } });
    el("dl-csv").addEventListener("click", downloadCsv);
    el("dl-json").addEventListener("click", function () {
      download("latents_shown.json", JSON.stringify(records()), "application/json");
    });
    window.addEventListener("hashchange", route);
    apply();
    route();
    BL.readyMs = performance.now();
    BL.ready = true;
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", init); } else { init(); }
}());
