/* neurontrace attribution-graph viewer: vanilla JS and SVG, no network, no library.
 * Every piece of graph data reaches the page through textContent or setAttribute, never as markup,
 * so prompts, tokens and descriptions are shown literally whatever they contain. */
(function () {
  "use strict";

  var svg = document.getElementById("graph-svg");
  // The namespace comes from the inline <svg> element, so the page needs no namespace URL of its own.
  var SVG_NS = svg.namespaceURI;
  var graph = JSON.parse(document.getElementById("graph-data").textContent);

  // ---- layout constants (px) ----
  var ROW_MIN = 15; // row height adapts to the window between these
  var ROW_MAX = 30;
  var LEFT = 64;
  var RIGHT = 28;
  var TOP = 58; // room for the logit labels
  var BAND_GAP = 14; // extra space around the embedding and logit rows
  var BOTTOM = 58; // room for the token labels
  var NODE_GAP = 15;
  var LOGIT_GAP = 70;
  var MIN_COL = 86;
  var DASH = "\u2014";

  // ---- the graph, normalised without touching what the user did not change ----
  if (!graph || typeof graph !== "object") graph = {};
  if (!Array.isArray(graph.nodes)) graph.nodes = [];
  if (!Array.isArray(graph.links)) graph.links = [];
  var meta = graph.metadata && typeof graph.metadata === "object" ? graph.metadata : {};
  if (!graph.qParams || typeof graph.qParams !== "object") graph.qParams = {};
  var q = graph.qParams;
  if (typeof q.pinnedIds === "string") q.pinnedIds = q.pinnedIds.split(",").filter(Boolean);
  if (!Array.isArray(q.pinnedIds)) q.pinnedIds = [];
  if (!Array.isArray(q.supernodes)) q.supernodes = [];

  var promptTokens = Array.isArray(meta.prompt_tokens) ? meta.prompt_tokens.map(String) : [];
  var nodes = graph.nodes.filter(function (n) {
    return n && typeof n === "object" && n.node_id !== undefined && n.node_id !== null;
  });
  var byId = new Map();
  nodes.forEach(function (n) {
    byId.set(String(n.node_id), n);
  });
  var links = graph.links.filter(function (l) {
    return l && byId.has(String(l.source)) && byId.has(String(l.target)) && isFinite(Number(l.weight));
  });
  var incoming = new Map();
  var outgoing = new Map();
  links.forEach(function (l) {
    push(outgoing, String(l.source), l);
    push(incoming, String(l.target), l);
  });
  var maxAbsWeight = links.reduce(function (m, l) {
    return Math.max(m, Math.abs(Number(l.weight)));
  }, 0) || 1;

  var state = {
    threshold: 1,
    selected: null,
    groupSel: new Set(),
    groupMode: false,
  };

  function push(map, key, value) {
    if (!map.has(key)) map.set(key, []);
    map.get(key).push(value);
  }

  // ---- node helpers ----
  function idOf(n) {
    return String(n.node_id);
  }

  function kindOf(n) {
    var t = String(n.feature_type || "").toLowerCase();
    if (t.indexOf("logit") >= 0) return "logit";
    if (t.indexOf("embed") >= 0 || String(n.layer) === "E") return "embedding";
    return "neuron";
  }

  function num(x) {
    if (x === null || x === undefined || x === "" || typeof x === "boolean") return NaN;
    return Number(x);
  }

  function fmt(x) {
    var v = num(x);
    if (!isFinite(v)) return DASH;
    if (v !== 0 && (Math.abs(v) >= 1e4 || Math.abs(v) < 1e-3)) return v.toExponential(2);
    return v.toFixed(3);
  }

  function posOf(n) {
    var p = num(n.ctx_idx);
    return isFinite(p) && p >= 0 ? Math.floor(p) : 0;
  }

  function polarity(n) {
    return num(n.activation) < 0 ? "-" : "+";
  }

  function idParts(n) {
    return idOf(n).split("_");
  }

  function logitToken(n) {
    if (typeof n.token === "string") return n.token;
    var m = /^Output "([\s\S]*)" \(p=/.exec(String(n.clerp || ""));
    return m ? m[1] : "#" + (idParts(n)[1] || n.feature);
  }

  function tokenOf(n) {
    if (kindOf(n) === "logit") return logitToken(n);
    if (typeof n.token === "string") return n.token;
    var p = posOf(n);
    return p < promptTokens.length ? promptTokens[p] : "";
  }

  // "L12/N345+" for a neuron (index from the node id: `feature` is a Cantor pair), else a short name.
  function label(n) {
    var k = kindOf(n);
    var parts = idParts(n);
    if (k === "neuron") {
      if (parts.length === 3 && /^\d+$/.test(parts[0]) && /^\d+$/.test(parts[1])) {
        return "L" + parts[0] + "/N" + parts[1] + polarity(n);
      }
      return idOf(n);
    }
    if (k === "embedding") return "Emb@" + posOf(n);
    return "Logit " + quote(logitToken(n));
  }

  function quote(tok) {
    return "\u201c" + tok + "\u201d";
  }

  // Whitespace made visible for labels drawn on the graph (the details panel shows the raw token).
  function visibleToken(tok) {
    return String(tok).replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5").replace(/ /g, "\u2423");
  }

  function truncate(text, max) {
    return text.length > max ? text.slice(0, Math.max(1, max - 1)) + "\u2026" : text;
  }

  function isPinned(id) {
    return q.pinnedIds.indexOf(id) >= 0;
  }

  function isVisible(n) {
    if (kindOf(n) !== "neuron" || isPinned(idOf(n))) return true;
    var inf = num(n.influence);
    return !isFinite(inf) || inf <= state.threshold;
  }

  // ---- layout: rows are layers (logits on top, embeddings at the bottom), columns are positions ----
  // Sized to fill the graph pane where it can (rows shrink to fit the height, columns widen to fill the
  // width); a graph too large for the pane keeps the minimum sizes and scrolls.
  var wrap = document.getElementById("graph-wrap");
  var layout = buildLayout();

  function buildLayout() {
    var availW = Math.max(wrap.clientWidth - 4, 300);
    var availH = Math.max(wrap.clientHeight - 4, 300);
    var nPos = promptTokens.length;
    nodes.forEach(function (n) {
      nPos = Math.max(nPos, posOf(n) + 1);
    });
    nPos = Math.max(nPos, 1);

    var layerSet = new Set();
    nodes.forEach(function (n) {
      if (kindOf(n) === "neuron") layerSet.add(String(n.layer));
    });
    var layers = Array.from(layerSet);
    var ints = layers.every(function (l) {
      return /^-?\d+$/.test(l);
    });
    if (ints && layers.length) {
      var nums = layers.map(Number);
      var lo = Math.min.apply(null, nums);
      var hi = Math.max.apply(null, nums);
      if (hi - lo <= 400) {
        layers = [];
        for (var l = lo; l <= hi; l++) layers.push(String(l));
      }
    }
    layers.sort(function (a, b) {
      var x = Number(a);
      var y = Number(b);
      if (isFinite(x) && isFinite(y)) return y - x;
      if (isFinite(x)) return -1;
      if (isFinite(y)) return 1;
      return a < b ? -1 : a > b ? 1 : 0;
    });

    var rowH = Math.floor((availH - TOP - BOTTOM - 2 * BAND_GAP) / (layers.length + 1));
    rowH = Math.min(ROW_MAX, Math.max(ROW_MIN, rowH));
    var rowY = new Map();
    var rows = [];
    var y = TOP;
    rows.push({ key: "logit", label: "Logits", y: y, major: true });
    y += rowH + BAND_GAP;
    layers.forEach(function (l, i) {
      rows.push({ key: "L" + l, label: "L" + l, y: y + i * rowH, major: Number(l) % 5 === 0 });
    });
    y += Math.max(layers.length - 1, 0) * rowH + rowH + BAND_GAP;
    rows.push({ key: "embedding", label: "Emb", y: y, major: true });
    rows.forEach(function (r) {
      rowY.set(r.key, r.y);
    });

    var cellCount = new Map();
    nodes.forEach(function (n) {
      var key = rowKey(n) + "\u0000" + posOf(n);
      cellCount.set(key, (cellCount.get(key) || 0) + 1);
    });
    var colW = [];
    for (var p = 0; p < nPos; p++) colW.push(MIN_COL);
    cellCount.forEach(function (count, key) {
      var parts = key.split("\u0000");
      var gap = parts[0] === "logit" ? LOGIT_GAP : NODE_GAP;
      var pos = Number(parts[1]);
      colW[pos] = Math.max(colW[pos], count * gap + 20);
    });
    var total = colW.reduce(function (a, b) {
      return a + b;
    }, 0);
    var stretch = Math.min(2.5, Math.max(1, (availW - LEFT - RIGHT) / total));
    colW = colW.map(function (w) {
      return Math.floor(w * stretch);
    });
    var colX = [];
    var x = LEFT;
    colW.forEach(function (w) {
      colX.push(x);
      x += w;
    });
    return {
      nPos: nPos,
      rowH: rowH,
      rows: rows,
      rowY: rowY,
      colX: colX,
      colW: colW,
      width: x + RIGHT,
      height: y + BOTTOM,
    };
  }

  function rowKey(n) {
    var k = kindOf(n);
    return k === "neuron" ? "L" + String(n.layer) : k;
  }

  // Positions of the visible nodes: each (row, position) cell spreads its nodes evenly across the column.
  function placeVisible(visible) {
    var cells = new Map();
    visible.forEach(function (n) {
      push(cells, rowKey(n) + "\u0000" + posOf(n), n);
    });
    var xy = new Map();
    cells.forEach(function (members) {
      members.sort(function (a, b) {
        var fa = num(a.feature);
        var fb = num(b.feature);
        if (fa !== fb && isFinite(fa) && isFinite(fb)) return fa - fb;
        return idOf(a) < idOf(b) ? -1 : 1;
      });
      members.forEach(function (n, i) {
        var p = posOf(n);
        var x0 = layout.colX[p];
        var w = layout.colW[p];
        xy.set(idOf(n), {
          x: x0 + (w * (i + 1)) / (members.length + 1),
          y: layout.rowY.get(rowKey(n)),
        });
      });
    });
    return xy;
  }

  // ---- SVG helpers ----
  function el(tag, attrs, parent) {
    var e = document.createElementNS(SVG_NS, tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        e.setAttribute(k, String(attrs[k]));
      });
    }
    if (parent) parent.appendChild(e);
    return e;
  }

  function text(parent, str, attrs) {
    var t = el("text", attrs, parent);
    t.textContent = str;
    return t;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function h(tag, cls, str, parent) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (str !== undefined && str !== null) e.textContent = String(str);
    if (parent) parent.appendChild(e);
    return e;
  }

  // ---- static parts: header and grid ----
  function drawHeader() {
    var title = meta.slug ? String(meta.slug) : "attribution graph";
    document.getElementById("graph-title").textContent = title;
    document.getElementById("graph-model").textContent = meta.scan ? String(meta.scan) : "";
    var prompt = typeof meta.prompt === "string" ? meta.prompt : promptTokens.join("");
    var promptEl = document.getElementById("prompt");
    promptEl.textContent = prompt;
    promptEl.title = prompt;
    document.title = title + " \u00b7 neurontrace";
    document.getElementById("node-total").textContent = String(nodes.length);
  }

  function drawGrid() {
    var g = document.getElementById("grid-layer");
    clear(g);
    svg.setAttribute("width", layout.width);
    svg.setAttribute("height", layout.height);
    svg.setAttribute("viewBox", "0 0 " + layout.width + " " + layout.height);
    var right = layout.width - RIGHT;
    layout.rows.forEach(function (r, i) {
      if (i % 2 === 0 || r.key === "logit" || r.key === "embedding") {
        el("rect", { class: "band", x: LEFT, y: r.y - layout.rowH / 2, width: right - LEFT, height: layout.rowH }, g);
      }
      text(g, r.label, { class: "row-label" + (r.major ? " major" : ""), x: LEFT - 10, y: r.y });
    });
    var top = layout.rows[0].y - layout.rowH / 2 - 34;
    var bottom = layout.rows[layout.rows.length - 1].y + layout.rowH / 2;
    for (var p = 0; p <= layout.nPos; p++) {
      var x = p < layout.nPos ? layout.colX[p] : right;
      el("line", { class: "col-line", x1: x, x2: x, y1: top, y2: bottom + 6 }, g);
    }
    for (var i = 0; i < layout.nPos; i++) {
      var cx = layout.colX[i] + layout.colW[i] / 2;
      var tok = i < promptTokens.length ? promptTokens[i] : "";
      var maxChars = Math.max(3, Math.floor((layout.colW[i] - 8) / 7.4));
      var t = text(g, truncate(visibleToken(tok), maxChars), { class: "tok-label", x: cx, y: bottom + 22 });
      t.setAttribute("data-pos", String(i));
      el("title", null, t).textContent = tok;
      text(g, String(i), { class: "pos-label", x: cx, y: bottom + 38 });
    }
  }

  // ---- dynamic parts ----
  function render() {
    var visible = nodes.filter(isVisible);
    var shown = new Set(visible.map(idOf));
    var xy = placeVisible(visible);
    var sel = state.selected && shown.has(state.selected) ? state.selected : null;
    var neighbours = new Set();
    if (sel) {
      (incoming.get(sel) || []).forEach(function (l) {
        neighbours.add(String(l.source));
      });
      (outgoing.get(sel) || []).forEach(function (l) {
        neighbours.add(String(l.target));
      });
    }
    drawSupernodes(xy);
    var edgeCount = drawEdges(shown, xy, sel);
    drawNodes(visible, xy, sel, neighbours);
    document.getElementById("node-count").textContent = String(visible.length);
    document.getElementById("edge-count").textContent = String(edgeCount);
    renderDetails();
    renderSupernodePanel();
  }

  function drawEdges(shown, xy, sel) {
    var g = document.getElementById("edge-layer");
    clear(g);
    var drawn = links.filter(function (l) {
      return shown.has(String(l.source)) && shown.has(String(l.target));
    });
    drawn.sort(function (a, b) {
      return Math.abs(a.weight) - Math.abs(b.weight);
    });
    drawn.forEach(function (l) {
      var s = xy.get(String(l.source));
      var t = xy.get(String(l.target));
      var w = Number(l.weight);
      var midY = (s.y + t.y) / 2;
      var d = "M" + s.x + "," + s.y + " C" + s.x + "," + midY + " " + t.x + "," + midY + " " + t.x + "," + t.y;
      var touches = sel && (String(l.source) === sel || String(l.target) === sel);
      var cls = "edge " + (w < 0 ? "neg" : "pos") + (sel ? (touches ? " hot" : " dim") : "");
      el(
        "path",
        {
          class: cls,
          d: d,
          "stroke-width": (0.5 + 3.5 * Math.sqrt(Math.abs(w) / maxAbsWeight)).toFixed(2),
          "data-source": String(l.source),
          "data-target": String(l.target),
          "data-weight": String(w),
        },
        g
      );
    });
    return drawn.length;
  }

  function nodeRadius(n) {
    var inf = num(n.influence);
    var importance = isFinite(inf) ? Math.min(1, Math.max(0, 1 - inf)) : 0.5;
    return 3.8 + 3.4 * importance;
  }

  function drawNodes(visible, xy, sel, neighbours) {
    var g = document.getElementById("node-layer");
    clear(g);
    visible.forEach(function (n) {
      var id = idOf(n);
      var k = kindOf(n);
      var p = xy.get(id);
      var cls = "node " + k;
      if (k === "neuron") cls += polarity(n) === "-" ? " neg" : " pos";
      if (isPinned(id)) cls += " pinned";
      if (state.groupSel.has(id)) cls += " grouped";
      if (sel === id) cls += " selected";
      if (sel && sel !== id && !neighbours.has(id)) cls += " dim";
      var ng = el("g", { class: cls, "data-node-id": id, transform: "translate(" + p.x + "," + p.y + ")" }, g);
      var r;
      if (k === "neuron") {
        r = nodeRadius(n);
        el("circle", { class: "shape", r: r.toFixed(2) }, ng);
      } else if (k === "embedding") {
        r = 6;
        el("rect", { class: "shape", x: -6, y: -6, width: 12, height: 12, rx: 2 }, ng);
      } else {
        r = 7.5;
        el("path", { class: "shape", d: "M0,-7.5 L7.5,0 L0,7.5 L-7.5,0 Z" }, ng);
        var prob = num(n.token_prob);
        text(ng, truncate(quote(visibleToken(logitToken(n))), 11), { class: "node-label", y: -24 });
        if (isFinite(prob) && prob > 0) {
          text(ng, (prob * 100).toFixed(1) + "%", { class: "node-label prob", y: -12 });
        }
      }
      if (state.groupSel.has(id)) el("circle", { class: "ring grouped", r: (r + 3.2).toFixed(2) }, ng);
      if (isPinned(id)) el("circle", { class: "ring pinned", r: (r + 3.2).toFixed(2) }, ng);
      if (sel === id) el("circle", { class: "ring selected", r: (r + 5.6).toFixed(2) }, ng);
    });
  }

  function drawSupernodes(xy) {
    var g = document.getElementById("supernode-layer");
    clear(g);
    q.supernodes.forEach(function (sn, index) {
      if (!Array.isArray(sn) || sn.length < 2) return;
      var pts = sn
        .slice(1)
        .map(function (id) {
          return xy.get(String(id));
        })
        .filter(Boolean);
      if (!pts.length) return;
      var x0 = Math.min.apply(null, pts.map(function (p) { return p.x; })) - 13;
      var x1 = Math.max.apply(null, pts.map(function (p) { return p.x; })) + 13;
      var y0 = Math.min.apply(null, pts.map(function (p) { return p.y; })) - 13;
      var y1 = Math.max.apply(null, pts.map(function (p) { return p.y; })) + 13;
      var sg = el("g", { class: "supernode", "data-index": index }, g);
      el("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0, rx: 9 }, sg);
      text(sg, String(sn[0]) + " (" + (sn.length - 1) + ")", { x: x0 + 4, y: y0 - 4 });
    });
  }

  // ---- details panel ----
  function renderDetails() {
    var box = document.getElementById("details");
    clear(box);
    var n = state.selected ? byId.get(state.selected) : null;
    if (!n) {
      h("h3", null, "Details", box);
      h("p", "empty", "Click a node to see its details and strongest edges. Hover for a quick look.", box);
      return;
    }
    var id = idOf(n);
    var k = kindOf(n);
    h("h2", "node-title", label(n), box).id = "details-title";
    h("div", "sub", (n.feature_type ? String(n.feature_type) : k) + " \u00b7 " + id, box);

    var actions = h("div", "actions", null, box);
    var pin = h("button", null, isPinned(id) ? "Unpin" : "Pin", actions);
    pin.type = "button";
    pin.id = "pin-btn";
    pin.addEventListener("click", function () {
      togglePin(id);
    });
    var grp = h("button", null, state.groupSel.has(id) ? "Remove from group" : "Add to group", actions);
    grp.type = "button";
    grp.id = "group-toggle-btn";
    grp.addEventListener("click", function () {
      toggleGroupSel(id);
    });

    var dl = h("dl", null, null, box);
    function row(name, value, cls) {
      h("dt", null, name, dl);
      h("dd", cls || null, value, dl);
    }
    var tok = tokenOf(n);
    if (k === "logit") {
      row("output", quote(tok), "mono");
      row("probability", fmt(n.token_prob));
      row("position", String(posOf(n)));
    } else {
      row("token", quote(tok), "mono");
      row("position", String(posOf(n)));
      row("layer", String(n.layer));
    }
    if (k !== "logit" || n.activation !== undefined) row("activation", fmt(n.activation));
    row("attribution", fmt(n.attribution));
    row("influence", fmt(n.influence));
    if (!isVisible(n)) row("shown", "hidden at this threshold");
    row("clerp", n.clerp ? String(n.clerp) : DASH);

    chips(box, "Top promoted tokens", n.top_tokens, "chip");
    chips(box, "Bottom (suppressed) tokens", n.bottom_tokens, "chip bottom");
    contexts(box, n.top_contexts);
    edgeList(box, "Strongest incoming", incoming.get(id) || [], "source");
    edgeList(box, "Strongest outgoing", outgoing.get(id) || [], "target");
  }

  function chips(box, title, tokens, cls) {
    if (!Array.isArray(tokens) || !tokens.length) return;
    h("h4", null, title, box);
    var wrap = h("div", "chips", null, box);
    tokens.slice(0, 20).forEach(function (t) {
      h("span", cls, String(t), wrap);
    });
  }

  // Top-activating contexts (from `neurontrace graph --contexts`): text before, the token, text after.
  function contexts(box, list) {
    if (!Array.isArray(list) || !list.length) return;
    h("h4", null, "Top-activating contexts", box);
    var ul = h("ul", "contexts", null, box);
    list.slice(0, 10).forEach(function (c) {
      var li = h("li", "mono", null, ul);
      h("span", "ctx-act", fmt(c.activation) + " ", li);
      h("span", null, joinTokens(c.before), li);
      h("mark", null, String(c.token === undefined ? "" : c.token), li);
      h("span", null, joinTokens(c.after), li);
    });
  }

  function joinTokens(tokens) {
    return Array.isArray(tokens) ? tokens.map(String).join("") : String(tokens === undefined ? "" : tokens);
  }

  function edgeList(box, title, list, end) {
    h("h4", null, title + " (" + list.length + ")", box);
    if (!list.length) {
      h("p", "hint", "none", box);
      return;
    }
    var ul = h("ul", "edges", null, box);
    list
      .slice()
      .sort(function (a, b) {
        return Math.abs(b.weight) - Math.abs(a.weight);
      })
      .slice(0, 8)
      .forEach(function (l) {
        var other = byId.get(String(l[end]));
        var li = h("li", null, null, ul);
        var b = h("button", isVisible(other) ? null : "hidden-node", null, li);
        b.type = "button";
        b.setAttribute("data-node-id", idOf(other));
        var w = Number(l.weight);
        h("span", "w " + (w < 0 ? "neg" : "pos"), (w >= 0 ? "+" : "") + fmt(w), b);
        h("span", "who", label(other) + (isVisible(other) ? "" : " (hidden)"), b);
        h("span", "where", quote(visibleToken(tokenOf(other))) + "@" + posOf(other), b);
        b.addEventListener("click", function () {
          select(idOf(other));
        });
      });
  }

  // ---- supernode panel ----
  function renderSupernodePanel() {
    var n = state.groupSel.size;
    document.getElementById("group-selection-count").textContent = String(n);
    var btn = document.getElementById("group-btn");
    btn.disabled = n < 2;
    btn.textContent = n >= 2 ? "Group " + n : "Group";
    document.getElementById("clear-group").disabled = n === 0;
    var modeBtn = document.getElementById("group-mode");
    modeBtn.setAttribute("aria-pressed", state.groupMode ? "true" : "false");
    var ul = document.getElementById("supernodes");
    clear(ul);
    q.supernodes.forEach(function (sn, index) {
      if (!Array.isArray(sn)) return;
      var li = h("li", "supernode-item", null, ul);
      li.setAttribute("data-index", String(index));
      h("span", "label", String(sn[0]), li).title = String(sn[0]);
      h("span", "n", Math.max(sn.length - 1, 0) + " nodes", li);
      var pick = h("button", "select-btn", "Select", li);
      pick.type = "button";
      pick.title = "Select the members for regrouping";
      pick.addEventListener("click", function () {
        state.groupSel = new Set(sn.slice(1).map(String));
        render();
      });
      var un = h("button", "ungroup-btn", "Ungroup", li);
      un.type = "button";
      un.addEventListener("click", function () {
        ungroup(index);
      });
    });
    if (!q.supernodes.length) h("li", "hint", "No supernodes yet.", ul);
  }

  // ---- actions ----
  function select(id) {
    state.selected = id && byId.has(id) ? id : null;
    q.clickedId = state.selected || "";
    render();
  }

  function togglePin(id) {
    var i = q.pinnedIds.indexOf(id);
    if (i >= 0) q.pinnedIds.splice(i, 1);
    else q.pinnedIds.push(id);
    render();
  }

  function toggleGroupSel(id) {
    if (state.groupSel.has(id)) state.groupSel.delete(id);
    else state.groupSel.add(id);
    render();
  }

  function group(labelText) {
    if (state.groupSel.size < 2) return false;
    var input = document.getElementById("supernode-label");
    var name = String(labelText !== undefined ? labelText : input.value).trim();
    if (!name) name = "group " + (q.supernodes.length + 1);
    q.supernodes.push([name].concat(Array.from(state.groupSel)));
    state.groupSel.clear();
    input.value = "";
    render();
    return true;
  }

  function ungroup(index) {
    if (index >= 0 && index < q.supernodes.length) q.supernodes.splice(index, 1);
    render();
  }

  function exportJSON() {
    return JSON.stringify(graph, null, 2);
  }

  function saveJSON() {
    var blob = new Blob([exportJSON()], { type: "application/json" });
    var url = URL.createObjectURL(blob);
    var a = document.createElement("a");
    a.href = url;
    a.download = (String(meta.slug || "graph").replace(/[^\w.-]+/g, "_") || "graph") + ".json";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () {
      URL.revokeObjectURL(url);
    }, 2000);
  }

  // ---- tooltip ----
  var tip = document.getElementById("tooltip");

  function showTip(evt, lines) {
    clear(tip);
    lines.forEach(function (ln) {
      h("div", ln[0], ln[1], tip);
    });
    tip.hidden = false;
    moveTip(evt);
  }

  function moveTip(evt) {
    var x = evt.clientX + 14;
    var y = evt.clientY + 14;
    var w = tip.offsetWidth;
    var hgt = tip.offsetHeight;
    if (x + w > window.innerWidth - 4) x = evt.clientX - w - 14;
    if (y + hgt > window.innerHeight - 4) y = evt.clientY - hgt - 14;
    tip.style.left = Math.max(4, x) + "px";
    tip.style.top = Math.max(4, y) + "px";
  }

  function nodeTip(n) {
    var lines = [["t", label(n)], ["m", quote(tokenOf(n)) + " @ " + posOf(n)]];
    var k = kindOf(n);
    if (k === "logit") lines.push(["m", "p = " + fmt(n.token_prob)]);
    else lines.push(["m", "act " + fmt(n.activation) + " \u00b7 attr " + fmt(n.attribution) + " \u00b7 infl " + fmt(n.influence)]);
    if (n.clerp) lines.push(["l", String(n.clerp)]);
    if (Array.isArray(n.top_tokens) && n.top_tokens.length) {
      lines.push(["m", "promotes " + n.top_tokens.slice(0, 5).map(String).join(" | ")]);
    }
    return lines;
  }

  // ---- events ----
  var clickedAt = null;
  svg.addEventListener("click", function (evt) {
    tip.hidden = true; // the details panel takes over from the tooltip until the pointer moves on
    clickedAt = { x: evt.clientX, y: evt.clientY };
    var target = evt.target.closest ? evt.target.closest(".node") : null;
    if (!target) {
      if (state.selected) select(null);
      return;
    }
    var id = target.getAttribute("data-node-id");
    if (evt.shiftKey) togglePin(id);
    else if (evt.ctrlKey || evt.metaKey || state.groupMode) toggleGroupSel(id);
    else select(id);
  });
  svg.addEventListener("mouseover", function (evt) {
    if (clickedAt && evt.clientX === clickedAt.x && evt.clientY === clickedAt.y) return;
    var nodeEl = evt.target.closest ? evt.target.closest(".node") : null;
    if (nodeEl) {
      var n = byId.get(nodeEl.getAttribute("data-node-id"));
      if (n) showTip(evt, nodeTip(n));
      return;
    }
    var edgeEl = evt.target.closest ? evt.target.closest(".edge") : null;
    if (edgeEl) {
      var s = byId.get(edgeEl.getAttribute("data-source"));
      var t = byId.get(edgeEl.getAttribute("data-target"));
      showTip(evt, [
        ["t", label(s) + " \u2192 " + label(t)],
        ["m", "weight " + fmt(edgeEl.getAttribute("data-weight"))],
      ]);
      return;
    }
    tip.hidden = true;
  });
  svg.addEventListener("mousemove", function (evt) {
    if (clickedAt && (evt.clientX !== clickedAt.x || evt.clientY !== clickedAt.y)) clickedAt = null;
    if (!tip.hidden) moveTip(evt);
  });
  svg.addEventListener("mouseleave", function () {
    tip.hidden = true;
  });

  var slider = document.getElementById("threshold");
  var sliderValue = document.getElementById("threshold-value");
  function onThreshold() {
    state.threshold = Number(slider.value);
    sliderValue.textContent = state.threshold.toFixed(3);
    render();
  }
  // Big graphs redraw at most once a frame while the slider is dragged; small ones at once.
  var big = nodes.length + links.length > 5000;
  var pendingFrame = 0;
  slider.addEventListener("input", function () {
    if (!big) return onThreshold();
    if (!pendingFrame) {
      pendingFrame = requestAnimationFrame(function () {
        pendingFrame = 0;
        onThreshold();
      });
    }
  });
  slider.addEventListener("change", onThreshold);

  document.getElementById("group-mode").addEventListener("click", function () {
    state.groupMode = !state.groupMode;
    render();
  });
  document.getElementById("group-btn").addEventListener("click", function () {
    group();
  });
  document.getElementById("supernode-label").addEventListener("keydown", function (evt) {
    if (evt.key === "Enter") group();
  });
  document.getElementById("clear-group").addEventListener("click", function () {
    state.groupSel.clear();
    render();
  });
  document.getElementById("save-json").addEventListener("click", saveJSON);
  document.addEventListener("keydown", function (evt) {
    if (evt.key !== "Escape") return;
    state.groupSel.clear();
    select(null);
  });

  var resizeTimer = null;
  window.addEventListener("resize", function () {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(function () {
      layout = buildLayout();
      drawGrid();
      render();
    }, 120);
  });

  // ---- start ----
  (function init() {
    var maxInf = nodes.reduce(function (m, n) {
      var v = num(n.influence);
      return isFinite(v) ? Math.max(m, v) : m;
    }, 0);
    var max = Math.max(1, Math.ceil(maxInf * 100) / 100);
    slider.max = String(max);
    var t = num(meta.node_threshold);
    slider.value = String(isFinite(t) && t >= 0 && t <= max ? t : max);
    state.threshold = Number(slider.value);
    sliderValue.textContent = state.threshold.toFixed(3);
    if (q.clickedId && byId.has(String(q.clickedId))) state.selected = String(q.clickedId);
    drawHeader();
    drawGrid();
    render();
  })();

  // For scripts and tests: the current graph (a copy, with the edited qParams) and the JSON Save writes.
  window.neurontraceGraph = function () {
    return JSON.parse(exportJSON());
  };
  window.neurontraceExportJSON = exportJSON;
  window.neurontrace = {
    select: select,
    togglePin: togglePin,
    toggleGroupSelection: toggleGroupSel,
    group: group,
    ungroup: ungroup,
    setThreshold: function (v) {
      slider.value = String(v);
      onThreshold();
    },
  };
})();
