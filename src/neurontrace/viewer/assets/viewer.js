/* neurontrace attribution-graph viewer: vanilla JS and SVG, no network, no library.
 * Every piece of graph data reaches the page through textContent or setAttribute, never as markup,
 * so prompts, tokens and descriptions are shown literally whatever they contain.
 *
 * It reads circuit-tracer / Neuronpedia graph JSON ({metadata, qParams, nodes, links}) as neurontrace writes it
 * and as circuit-tracer's own frontend saves it (qParams values as strings). The view lives in graph.qParams
 * (what Save JSON writes: pinnedIds, supernodes, clerps as arrays; linkType, clickedId, sg_pos, pruningThreshold)
 * and in the URL hash, to share: #pinned=ID,ID&threshold=T&clicked=ID&link=both&graph=SLUG[&sg=SG_POS]. */
(function () {
  "use strict";

  var svg = document.getElementById("graph-svg");
  // The namespace comes from the inline <svg> element, so the page needs no namespace URL of its own.
  var SVG_NS = svg.namespaceURI;
  var graph = readBlock("graph-data");
  var siblingsData = readBlock("graph-index");

  // ---- layout constants (px) ----
  var ROW_MIN = 12; // row height adapts to the window between these
  var ROW_MAX = 30;
  var AXIS_W = 58; // the layer axis, kept in view on the left
  var PAD_L = 10;
  var PAD_R = 24;
  var TOP = 58; // room for the logit labels
  var BAND_GAP = 14; // extra space around the embedding and logit rows
  var PAD_B = 10;
  var NODE_GAP = 15;
  var LOGIT_GAP = 70;
  var ROT_CHARS = 14; // rotated token labels are cut to this many characters (the full text is their title)
  var WS_MX = 80; // workspace margins
  var WS_TOP = 24;
  var WS_BOTTOM = 40;
  var WS_ROW = 44; // least room between workspace rows
  var DASH = "\u2014";
  var LINK_TYPES = ["input", "output", "both"];
  // diverging edge colours, [light, dark]: excitatory green, inhibitory purple
  var POS_RGB = [[199, 233, 192], [0, 109, 44]];
  var NEG_RGB = [[231, 212, 232], [118, 42, 131]];

  function readBlock(id) {
    var e = document.getElementById(id);
    if (!e) return null;
    try {
      return JSON.parse(e.textContent);
    } catch (err) {
      return null;
    }
  }

  // ---- small helpers ----
  function push(map, key, value) {
    if (!map.has(key)) map.set(key, []);
    map.get(key).push(value);
  }

  function num(x) {
    if (x === null || x === undefined || typeof x === "boolean") return NaN;
    if (typeof x === "string" && !x.trim()) return NaN;
    return Number(x);
  }

  function fmt(x) {
    var v = num(x);
    if (!isFinite(v)) return DASH;
    if (v !== 0 && (Math.abs(v) >= 1e4 || Math.abs(v) < 1e-3)) return v.toExponential(2);
    return v.toFixed(3);
  }

  function fmtPct(p) {
    if (!isFinite(p)) return DASH;
    return (p >= 0 ? "+" : "") + (100 * p).toFixed(1) + "%";
  }

  function clamp01(v) {
    return Math.min(1, Math.max(0, v));
  }

  function decode(s) {
    try {
      return decodeURIComponent(String(s).replace(/\+/g, " "));
    } catch (err) {
      return String(s);
    }
  }

  function parseJSON(s) {
    try {
      return JSON.parse(s);
    } catch (err) {
      return undefined;
    }
  }

  function uniqStrings(list) {
    var out = [];
    list.forEach(function (x) {
      if (x === null || x === undefined) return;
      var s = String(x);
      if (s !== "" && out.indexOf(s) < 0) out.push(s);
    });
    return out;
  }

  // ---- the graph, normalised without touching what the user did not change ----
  if (!graph || typeof graph !== "object" || Array.isArray(graph)) graph = {};
  if (!Array.isArray(graph.nodes)) graph.nodes = [];
  if (!Array.isArray(graph.links)) graph.links = [];
  var meta = graph.metadata && typeof graph.metadata === "object" ? graph.metadata : {};
  if (!graph.qParams || typeof graph.qParams !== "object" || Array.isArray(graph.qParams)) graph.qParams = {};
  var q = graph.qParams; // edited in place: keys the viewer does not know are kept as they are
  var slug = meta.slug === undefined || meta.slug === null ? "" : String(meta.slug);

  // circuit-tracer's frontend saves these as strings ("id1,id2", JSON text); the viewer keeps arrays
  q.pinnedIds = idList(q.pinnedIds);
  q.supernodes = supernodeList(q.supernodes);
  var clerpEdits = clerpMap(q.clerps); // user labels keyed by the node's `feature`
  if (q.clerps !== undefined) q.clerps = clerpArray();
  if (q.pruningThreshold !== undefined && isFinite(num(q.pruningThreshold))) {
    q.pruningThreshold = num(q.pruningThreshold);
  }
  q.linkType = linkTypeOf(q.linkType);
  q.clickedId = q.clickedId === undefined || q.clickedId === null ? "" : String(q.clickedId);
  if (q.sg_pos === undefined || q.sg_pos === null) q.sg_pos = "";

  function idList(v) {
    if (typeof v === "string") {
      var s = v.trim();
      var parsed = s.charAt(0) === "[" ? parseJSON(s) : undefined;
      if (!Array.isArray(parsed)) {
        return uniqStrings(
          s.split(",").map(function (x) {
            return x.trim();
          })
        );
      }
      v = parsed;
    }
    return Array.isArray(v) ? uniqStrings(v) : [];
  }

  function supernodeList(v) {
    if (typeof v === "string") v = v.trim() ? parseJSON(v) : [];
    if (!Array.isArray(v)) return [];
    var out = [];
    v.forEach(function (sn) {
      if (!Array.isArray(sn) || !sn.length) return;
      out.push([String(sn[0] === null || sn[0] === undefined ? "" : sn[0])].concat(uniqStrings(sn.slice(1))));
    });
    return out;
  }

  function clerpMap(v) {
    if (typeof v === "string") v = v.trim() ? parseJSON(v) : [];
    var m = new Map();
    if (Array.isArray(v)) {
      v.forEach(function (pair) {
        if (Array.isArray(pair) && pair.length >= 2 && pair[1] !== null && pair[1] !== undefined) {
          m.set(String(pair[0]), String(pair[1]));
        }
      });
    } else if (v && typeof v === "object") {
      Object.keys(v).forEach(function (k) {
        m.set(String(k), String(v[k]));
      });
    }
    return m;
  }

  function clerpArray() {
    var out = [];
    clerpEdits.forEach(function (labelText, feature) {
      out.push([feature, labelText]);
    });
    return out;
  }

  function linkTypeOf(v) {
    var s = String(v === undefined || v === null ? "" : v).toLowerCase();
    if (s === "inputs") s = "input";
    if (s === "outputs") s = "output";
    return LINK_TYPES.indexOf(s) >= 0 ? s : "both";
  }

  var promptTokens = Array.isArray(meta.prompt_tokens) ? meta.prompt_tokens.map(String) : [];
  var nodes = [];
  var byId = new Map();
  var kinds = new Map();
  graph.nodes.forEach(function (n) {
    if (!n || typeof n !== "object" || n.node_id === undefined || n.node_id === null) return;
    var id = String(n.node_id);
    if (byId.has(id)) return;
    byId.set(id, n);
    kinds.set(n, computeKind(n));
    nodes.push(n);
  });

  // Links, each with pctInput: its weight over the summed |weight| of every link into the same target.
  var edges = [];
  var inTotal = new Map();
  var incoming = new Map();
  var outgoing = new Map();
  graph.links.forEach(function (l) {
    if (!l || typeof l !== "object") return;
    var s = String(l.source);
    var t = String(l.target);
    var w = num(l.weight);
    if (!byId.has(s) || !byId.has(t) || !isFinite(w)) return;
    var e = { s: s, t: t, w: w, pct: 0 };
    edges.push(e);
    push(outgoing, s, e);
    push(incoming, t, e);
    inTotal.set(t, (inTotal.get(t) || 0) + Math.abs(w));
  });
  edges.forEach(function (e) {
    var total = inTotal.get(e.t);
    e.pct = total > 0 ? e.w / total : 0;
  });

  // ---- node helpers ----
  function idOf(n) {
    return String(n.node_id);
  }

  function computeKind(n) {
    var t = String(n.feature_type || "").toLowerCase();
    if (t.indexOf("logit") >= 0) return "logit";
    if (t.indexOf("embed") >= 0 || String(n.layer) === "E") return "embedding";
    if (t.indexOf("error") >= 0) return "error";
    return "neuron"; // "cross layer transcoder", legacy "mlp neuron", "unexplored node", ...
  }

  function kindOf(n) {
    return kinds.get(n) || computeKind(n);
  }

  function thresholded(n) {
    var k = kindOf(n);
    return k === "neuron" || k === "error";
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
    var clerp = String(n.clerp || "");
    var m = /^Output "([\s\S]*)" \(p=/.exec(clerp) || /^Output '([\s\S]*)' \(p=/.exec(clerp);
    if (m) return m[1].replace(/\uff02/g, '"');
    return "#" + (idParts(n)[1] || n.feature);
  }

  function tokenOf(n) {
    if (kindOf(n) === "logit") return logitToken(n);
    if (typeof n.token === "string") return n.token;
    var p = posOf(n);
    return p < promptTokens.length ? promptTokens[p] : "";
  }

  function neuronIndex(n) {
    var i = num(n.index);
    if (isFinite(i)) return String(i);
    var parts = idParts(n);
    return parts.length === 3 && /^\d+$/.test(parts[1]) ? parts[1] : null;
  }

  function layerOf(n) {
    var l = n.layer;
    if (l === undefined || l === null) {
      var parts = idParts(n);
      return kindOf(n) === "error" ? parts[1] || "?" : parts[0] || "?";
    }
    return String(l);
  }

  // "L12/N345+" for a neuron (its index, or from the node id: `feature` is a Cantor pair), else a short name.
  function label(n) {
    var k = kindOf(n);
    if (k === "neuron") {
      var layer = layerOf(n);
      var index = neuronIndex(n);
      if (index === null || !/^\d+$/.test(layer)) return idOf(n);
      var type = String(n.feature_type || "").toLowerCase();
      var isNeuron = n.unit === "mlp neuron" || type === "mlp neuron" || type.indexOf("transcoder") < 0;
      return "L" + layer + "/" + (isNeuron ? "N" + index + polarity(n) : "F" + index);
    }
    if (k === "error") return "Err L" + layerOf(n) + "@" + posOf(n);
    if (k === "embedding") return "Emb@" + posOf(n);
    return "Logit " + quote(logitToken(n));
  }

  function editedClerp(n) {
    if (kindOf(n) !== "neuron" || n.feature === undefined || n.feature === null) return null;
    var v = clerpEdits.get(String(n.feature));
    return v === undefined ? null : v;
  }

  function clerpOf(n) {
    var e = editedClerp(n);
    if (e !== null) return e;
    return typeof n.clerp === "string" ? n.clerp : "";
  }

  function topTokens(n) {
    return Array.isArray(n.top_logit_effects) ? n.top_logit_effects : n.top_tokens;
  }

  function bottomTokens(n) {
    return Array.isArray(n.bottom_logit_effects) ? n.bottom_logit_effects : n.bottom_tokens;
  }

  function quote(tok) {
    return "\u201c" + tok + "\u201d";
  }

  // Whitespace made visible for labels drawn on the graph (the details panel shows the raw token).
  function visibleToken(tok) {
    return String(tok).replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5").replace(/ /g, "\u2423");
  }

  function truncate(str, max) {
    str = String(str);
    return str.length > max ? str.slice(0, Math.max(1, max - 1)) + "\u2026" : str;
  }

  function isPinned(id) {
    return q.pinnedIds.indexOf(id) >= 0;
  }

  // ---- threshold: the default shows every node of the file ----
  var maxInfluence = nodes.reduce(function (m, n) {
    var v = num(n.influence);
    return thresholded(n) && isFinite(v) ? Math.max(m, v) : m;
  }, -Infinity);
  var nodeThreshold = num(meta.node_threshold);
  var defaultThreshold = Math.max(isFinite(nodeThreshold) ? nodeThreshold : -Infinity, maxInfluence);
  if (!(defaultThreshold > 0)) defaultThreshold = 1;

  function isVisible(n) {
    if (!thresholded(n) || isPinned(idOf(n))) return true;
    var inf = num(n.influence);
    return !isFinite(inf) || inf <= state.threshold;
  }

  var state = {
    threshold: defaultThreshold,
    selected: null,
    groupSel: new Set(),
    groupMode: false,
  };
  if (typeof q.pruningThreshold === "number" && q.pruningThreshold >= 0) state.threshold = q.pruningThreshold;

  // ---- the URL hash: read on load (it wins over qParams) and rewritten on every change ----
  function readHash() {
    var out = {};
    String(location.hash || "")
      .replace(/^#/, "")
      .split("&")
      .forEach(function (part) {
        if (!part) return;
        var i = part.indexOf("=");
        out[decode(i < 0 ? part : part.slice(0, i))] = i < 0 ? "" : part.slice(i + 1);
      });
    return out;
  }

  function hashIds(raw) {
    var pieces = String(raw).split(",").map(decode);
    if (pieces.length === 1 && pieces[0].indexOf(",") >= 0) pieces = pieces[0].split(",");
    return uniqStrings(pieces);
  }

  // Returns true when the hash changed the graph's own state (pins, selection, positions).
  function applyHash(hash) {
    var own = !("graph" in hash) || decode(hash.graph) === slug; // a hash for another graph: not its node ids
    if (own) {
      if ("pinned" in hash) q.pinnedIds = hashIds(hash.pinned);
      if ("clicked" in hash) q.clickedId = decode(hash.clicked);
      if ("sg" in hash) {
        q.sg_pos = decode(hash.sg);
        wsManual = parseSgPos(q.sg_pos);
      }
    }
    if ("link" in hash) q.linkType = linkTypeOf(decode(hash.link));
    if ("threshold" in hash) {
      var t = num(decode(hash.threshold));
      if (isFinite(t) && t >= 0) {
        if (t !== state.threshold) q.pruningThreshold = t;
        state.threshold = t;
      }
    }
    state.selected = q.clickedId && byId.has(q.clickedId) ? q.clickedId : null;
  }

  function hashString() {
    var parts = [
      "pinned=" + q.pinnedIds.map(encodeURIComponent).join(","),
      "threshold=" + encodeURIComponent(String(state.threshold)),
      "clicked=" + encodeURIComponent(state.selected || ""),
      "link=" + encodeURIComponent(q.linkType),
      "graph=" + encodeURIComponent(slug),
    ];
    var sg = typeof q.sg_pos === "string" ? q.sg_pos : "";
    if (sg) parts.push("sg=" + encodeURIComponent(sg));
    return "#" + parts.join("&");
  }

  // replaceState at most every 200 ms (the browser throttles a page that rewrites its URL too often)
  var lastHash = null;
  var lastHashAt = 0;
  var hashTimer = 0;
  function writeHashNow() {
    clearTimeout(hashTimer);
    hashTimer = 0;
    lastHashAt = Date.now();
    var target = hashString();
    lastHash = target;
    if (location.hash === target) return;
    try {
      history.replaceState(history.state, "", target);
    } catch (err) {
      try {
        location.replace(target);
      } catch (err2) {
        /* a page that may not rewrite its address keeps working without it */
      }
    }
    lastHash = location.hash;
  }

  function scheduleHash() {
    if (hashTimer) return;
    var wait = 200 - (Date.now() - lastHashAt);
    if (wait <= 0) writeHashNow();
    else hashTimer = setTimeout(writeHashNow, wait);
  }

  // ---- layout: rows are layers (logits on top, embeddings at the bottom), columns are positions ----
  // Sized to fill the graph pane where it can (rows shrink to fit the height, columns widen to fill the
  // width); a graph too large for the pane keeps the minimum sizes and scrolls, its axes staying in view.
  var wrap = document.getElementById("graph-wrap");
  var layout = null;

  function buildLayout() {
    var availW = Math.max(wrap.clientWidth - AXIS_W - 20, 300); // 20: room for a vertical scroll bar
    var nPos = promptTokens.length;
    nodes.forEach(function (n) {
      nPos = Math.max(nPos, posOf(n) + 1);
    });
    nPos = Math.max(nPos, 1);

    var layerSet = new Set();
    nodes.forEach(function (n) {
      if (thresholded(n)) layerSet.add(layerOf(n));
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

    // columns: wide enough for their busiest cell; narrower minimum for long prompts
    var minCol = nPos > 24 ? 40 : nPos > 12 ? 60 : 86;
    var cellCount = new Map();
    nodes.forEach(function (n) {
      var key = rowKey(n) + "\u0000" + posOf(n);
      cellCount.set(key, (cellCount.get(key) || 0) + 1);
    });
    var colW = [];
    for (var p = 0; p < nPos; p++) colW.push(minCol);
    cellCount.forEach(function (count, key) {
      var parts = key.split("\u0000");
      var gap = parts[0] === "logit" ? LOGIT_GAP : NODE_GAP;
      var pos = Number(parts[1]);
      colW[pos] = Math.max(colW[pos], count * gap + 20);
    });
    var total = colW.reduce(function (a, b) {
      return a + b;
    }, 0);
    var stretch = Math.min(2.5, Math.max(1, (availW - PAD_L - PAD_R) / total));
    colW = colW.map(function (w) {
      return Math.floor(w * stretch);
    });
    var colX = [];
    var x = PAD_L;
    colW.forEach(function (w) {
      colX.push(x);
      x += w;
    });

    // token labels: level when every one fits its column, else all rotated (cut, the full text as title)
    var rotate = false;
    var tokText = [];
    for (var i = 0; i < nPos; i++) {
      var vis = visibleToken(i < promptTokens.length ? promptTokens[i] : "");
      if (vis.length > Math.max(3, Math.floor((colW[i] - 8) / 7.4))) rotate = true;
      tokText.push(vis);
    }
    var longest = 0;
    tokText = tokText.map(function (vis, i) {
      var t = rotate ? truncate(vis, ROT_CHARS) : truncate(vis, Math.max(3, Math.floor((colW[i] - 8) / 7.4)));
      longest = Math.max(longest, t.length);
      return t;
    });
    var tokH = rotate ? Math.min(150, 34 + Math.ceil(longest * 7.3 * 0.71)) : 44;

    var scrollBar = x + PAD_R > availW + 16 ? 16 : 0; // a horizontal scroll bar takes height
    var availH = Math.max(wrap.clientHeight - tokH - scrollBar - 4, 260);
    var rowH = Math.floor((availH - TOP - PAD_B - 2 * BAND_GAP) / (layers.length + 2));
    rowH = Math.min(ROW_MAX, Math.max(ROW_MIN, rowH));
    var rowY = new Map();
    var rows = [];
    var y = TOP;
    rows.push({ key: "logit", label: "Logits", y: y, major: true });
    y += rowH + BAND_GAP;
    layers.forEach(function (layerName, j) {
      rows.push({ key: "L" + layerName, label: "L" + layerName, y: y + j * rowH, major: Number(layerName) % 5 === 0 });
    });
    y += Math.max(layers.length - 1, 0) * rowH + rowH + BAND_GAP;
    rows.push({ key: "embedding", label: "Emb", y: y, major: true });
    rows.forEach(function (r) {
      rowY.set(r.key, r.y);
    });
    return {
      nPos: nPos,
      rowH: rowH,
      rows: rows,
      rowY: rowY,
      colX: colX,
      colW: colW,
      width: x + PAD_R,
      height: Math.ceil(y + rowH / 2 + PAD_B),
      rotate: rotate,
      tokText: tokText,
      tokH: tokH,
    };
  }

  function rowKey(n) {
    return thresholded(n) ? "L" + layerOf(n) : kindOf(n);
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
        var ka = kindOf(a) === "error" ? 1 : 0;
        var kb = kindOf(b) === "error" ? 1 : 0;
        if (ka !== kb) return ka - kb;
        var fa = num(a.feature);
        var fb = num(b.feature);
        if (fa !== fb && isFinite(fa) && isFinite(fb)) return fa - fb;
        return idOf(a) < idOf(b) ? -1 : 1;
      });
      members.forEach(function (n, i) {
        var p = posOf(n);
        xy.set(idOf(n), {
          x: layout.colX[p] + (layout.colW[p] * (i + 1)) / (members.length + 1),
          y: layout.rowY.get(rowKey(n)),
        });
      });
    });
    return xy;
  }

  // ---- DOM helpers ----
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

  // Colour, opacity and width of an edge from its share of the target's input.
  function edgeStyle(pct) {
    var s = Math.sqrt(Math.min(1, Math.abs(pct) || 0));
    var c = pct < 0 ? NEG_RGB : POS_RGB;
    var rgb = [0, 1, 2].map(function (i) {
      return Math.round(c[0][i] + (c[1][i] - c[0][i]) * s);
    });
    return {
      color: "rgb(" + rgb.join(",") + ")",
      opacity: (0.25 + 0.7 * s).toFixed(3),
      width: 0.6 + 3.4 * s,
    };
  }

  // ---- static parts: header, grid and axes ----
  function drawHeader() {
    var title = slug || "attribution graph";
    document.getElementById("graph-title").textContent = title;
    // the model's name: neurontrace's metadata has it; circuit-tracer's scan names a feature set (or folder)
    var own = meta.neurontrace && typeof meta.neurontrace === "object" ? meta.neurontrace.model : null;
    document.getElementById("graph-model").textContent = own ? String(own) : meta.scan ? String(meta.scan) : "";
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
    var W = layout.width;
    var H = layout.height;
    svg.setAttribute("width", W);
    svg.setAttribute("height", H);
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    var right = W - PAD_R;
    var axis = document.getElementById("layer-axis");
    clear(axis);
    axis.setAttribute("width", AXIS_W);
    axis.setAttribute("height", H);
    axis.setAttribute("viewBox", "0 0 " + AXIS_W + " " + H);
    layout.rows.forEach(function (r, i) {
      if (i % 2 === 0 || r.key === "logit" || r.key === "embedding") {
        var band = { class: "band", y: r.y - layout.rowH / 2, height: layout.rowH };
        el("rect", Object.assign({ x: PAD_L, width: right - PAD_L }, band), g);
        el("rect", Object.assign({ x: AXIS_W - 4, width: 4 }, band), axis);
      }
      var t = text(axis, r.label, { class: "row-label" + (r.major ? " major" : ""), x: AXIS_W - 8, y: r.y });
      t.setAttribute("data-row", r.key);
    });
    var top = layout.rows[0].y - layout.rowH / 2 - 34;
    for (var p = 0; p <= layout.nPos; p++) {
      var x = p < layout.nPos ? layout.colX[p] : right;
      el("line", { class: "col-line", x1: x, x2: x, y1: top, y2: H }, g);
    }

    var tax = document.getElementById("token-axis");
    clear(tax);
    var tokH = layout.tokH;
    tax.setAttribute("width", W);
    tax.setAttribute("height", tokH);
    tax.setAttribute("viewBox", "0 0 " + W + " " + tokH);
    tax.setAttribute("class", layout.rotate ? "rotated" : "");
    var corner = document.getElementById("axis-corner");
    clear(corner);
    corner.setAttribute("width", AXIS_W);
    corner.setAttribute("height", tokH);
    text(corner, "pos", { class: "row-label", x: AXIS_W - 8, y: layout.rotate ? 12 : 30 });
    for (var i = 0; i < layout.nPos; i++) {
      var cx = layout.colX[i] + layout.colW[i] / 2;
      var tok = i < promptTokens.length ? promptTokens[i] : "";
      el("line", { class: "col-line", x1: layout.colX[i], x2: layout.colX[i], y1: 0, y2: 6 }, tax);
      var t2;
      if (layout.rotate) {
        text(tax, String(i), { class: "pos-label", x: cx, y: 12 });
        t2 = text(tax, layout.tokText[i], {
          class: "tok-label rot",
          x: cx + 3,
          y: 24,
          transform: "rotate(-45 " + (cx + 3) + " 24)",
        });
      } else {
        t2 = text(tax, layout.tokText[i], { class: "tok-label", x: cx, y: 18 });
        text(tax, String(i), { class: "pos-label", x: cx, y: 34 });
      }
      t2.setAttribute("data-pos", String(i));
      el("title", null, t2).textContent = tok;
    }
  }

  // ---- dynamic parts ----
  function linkMatches(e, sel) {
    return (q.linkType !== "output" && e.t === sel) || (q.linkType !== "input" && e.s === sel);
  }

  function render() {
    var visible = nodes.filter(isVisible);
    var shown = new Set(visible.map(idOf));
    var xy = placeVisible(visible);
    var sel = state.selected && shown.has(state.selected) ? state.selected : null;
    var neighbours = new Set();
    if (sel) {
      edges.forEach(function (e) {
        if (linkMatches(e, sel)) neighbours.add(e.s === sel ? e.t : e.s);
      });
    }
    drawSupernodes(xy);
    var edgeCount = drawEdges(shown, xy, sel);
    drawNodes(visible, xy, sel, neighbours);
    document.getElementById("node-count").textContent = String(visible.length);
    document.getElementById("edge-count").textContent = String(edgeCount);
    renderDetails();
    renderSupernodePanel();
    renderWorkspace();
    syncControls();
    scheduleHash();
  }

  function syncControls() {
    LINK_TYPES.forEach(function (t) {
      document.getElementById("link-" + t).checked = q.linkType === t;
    });
  }

  function drawEdges(shown, xy, sel) {
    var g = document.getElementById("edge-layer");
    clear(g);
    var drawn = edges.filter(function (e) {
      return shown.has(e.s) && shown.has(e.t);
    });
    var hot = new Set();
    if (sel) {
      drawn.forEach(function (e) {
        if (linkMatches(e, sel)) hot.add(e);
      });
    }
    drawn.sort(function (a, b) {
      return (hot.has(a) ? 1 : 0) - (hot.has(b) ? 1 : 0) || Math.abs(a.pct) - Math.abs(b.pct);
    });
    drawn.forEach(function (e) {
      var s = xy.get(e.s);
      var t = xy.get(e.t);
      var midY = (s.y + t.y) / 2;
      var d = "M" + s.x + "," + s.y + " C" + s.x + "," + midY + " " + t.x + "," + midY + " " + t.x + "," + t.y;
      var st = edgeStyle(e.pct);
      var cls = "edge " + (e.w < 0 ? "neg" : "pos") + (sel ? (hot.has(e) ? " hot" : " dim") : "");
      el(
        "path",
        {
          class: cls,
          d: d,
          stroke: st.color,
          "stroke-opacity": st.opacity,
          "stroke-width": st.width.toFixed(2),
          "data-source": e.s,
          "data-target": e.t,
          "data-weight": String(e.w),
          "data-pct-input": String(e.pct),
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

  function nodeClass(n, id, base) {
    var k = kindOf(n);
    var cls = base + " " + k;
    if (k === "neuron") cls += polarity(n) === "-" ? " neg" : " pos";
    if (k === "logit" && n.is_target_logit === true) cls += " target";
    if (isPinned(id)) cls += " pinned";
    return cls;
  }

  // The node's shape, centred on (0, 0), into `parent`; returns its radius.
  function drawShape(parent, n, scale) {
    var k = kindOf(n);
    var r;
    if (k === "neuron") {
      r = nodeRadius(n) * scale;
      el("circle", { class: "shape", r: r.toFixed(2) }, parent);
    } else if (k === "embedding") {
      r = 6 * scale;
      el("rect", { class: "shape", x: -r, y: -r, width: 2 * r, height: 2 * r, rx: 2 }, parent);
    } else {
      r = (k === "error" ? 5.5 : 7.5) * scale;
      el("path", { class: "shape", d: "M0," + -r + " L" + r + ",0 L0," + r + " L" + -r + ",0 Z" }, parent);
    }
    return r;
  }

  function drawNodes(visible, xy, sel, neighbours) {
    var g = document.getElementById("node-layer");
    clear(g);
    visible.forEach(function (n) {
      var id = idOf(n);
      var k = kindOf(n);
      var p = xy.get(id);
      var cls = nodeClass(n, id, "node");
      if (state.groupSel.has(id)) cls += " grouped";
      if (sel === id) cls += " selected";
      if (sel && sel !== id && !neighbours.has(id)) cls += " dim";
      var ng = el("g", { class: cls, "data-node-id": id, transform: "translate(" + p.x + "," + p.y + ")" }, g);
      var r = drawShape(ng, n, 1);
      if (k === "logit") {
        var prob = num(n.token_prob);
        el("rect", { class: "hit", x: -26, y: -36, width: 52, height: 46 }, ng); // its labels click too
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
      var xs = pts.map(function (p) {
        return p.x;
      });
      var ys = pts.map(function (p) {
        return p.y;
      });
      var x0 = Math.min.apply(null, xs) - 13;
      var x1 = Math.max.apply(null, xs) + 13;
      var y0 = Math.min.apply(null, ys) - 13;
      var y1 = Math.max.apply(null, ys) + 13;
      var sg = el("g", { class: "supernode", "data-index": index }, g);
      el("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0, rx: 9 }, sg);
      text(sg, String(sn[0]) + " (" + (sn.length - 1) + ")", { x: x0 + 4, y: y0 - 4 });
    });
  }

  // ---- details panel ----
  function renderDetails() {
    var box = document.getElementById("details");
    var typing = document.activeElement && document.activeElement.id === "clerp-input";
    if (typing && box.getAttribute("data-for") === String(state.selected)) return; // keep the label being typed
    clear(box);
    box.setAttribute("data-for", String(state.selected));
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
      return h("dd", cls || null, value, dl);
    }
    var tok = tokenOf(n);
    if (k === "logit") {
      row("output", quote(tok), "mono");
      row("probability", fmt(n.token_prob));
      row("position", String(posOf(n)));
    } else {
      row("token", quote(tok), "mono");
      row("position", String(posOf(n)));
      row("layer", k === "embedding" ? "embedding" : layerOf(n));
    }
    if (k === "neuron" && neuronIndex(n) !== null) row("index", neuronIndex(n));
    if (k !== "embedding" && n.activation !== undefined) row("activation", fmt(n.activation));
    if (n.attribution !== undefined) row("attribution", fmt(n.attribution));
    row("influence", fmt(n.influence));
    if (!isVisible(n)) row("shown", "hidden at this threshold");
    var edited = editedClerp(n);
    if (edited !== null) row("label", edited, "edited-label").id = "details-label";
    row("clerp", n.clerp ? String(n.clerp) : DASH);

    if (k === "neuron" && n.feature !== undefined && n.feature !== null) {
      var edit = h("div", "row clerp-edit", null, box);
      var inp = h("input", null, null, edit);
      inp.type = "text";
      inp.id = "clerp-input";
      inp.maxLength = 120;
      inp.placeholder = "your label for this neuron";
      inp.value = clerpOf(n);
      var save = h("button", null, "Set label", edit);
      save.type = "button";
      save.id = "clerp-save";
      var commit = function () {
        inp.blur();
        setClerp(id, inp.value);
      };
      save.addEventListener("click", commit);
      inp.addEventListener("keydown", function (evt) {
        if (evt.key === "Enter") commit();
      });
    }

    chips(box, "Top promoted tokens", topTokens(n), "chip");
    chips(box, "Bottom (suppressed) tokens", bottomTokens(n), "chip bottom");
    contexts(box, n.top_contexts);
    edgeList(box, "Strongest incoming", incoming.get(id) || [], "s", "share of this node's input");
    edgeList(box, "Strongest outgoing", outgoing.get(id) || [], "t", "share of the target's input");
  }

  function chips(box, title, tokens, cls) {
    if (!Array.isArray(tokens) || !tokens.length) return;
    h("h4", null, title, box);
    var wrapEl = h("div", "chips", null, box);
    tokens.slice(0, 20).forEach(function (t) {
      h("span", cls, String(t), wrapEl);
    });
  }

  // Top-activating contexts (from `neurontrace graph --contexts`): text before, the token, text after.
  function contexts(box, list) {
    if (!Array.isArray(list) || !list.length) return;
    h("h4", null, "Top-activating contexts", box);
    var ul = h("ul", "contexts", null, box);
    list.slice(0, 10).forEach(function (c) {
      if (!c || typeof c !== "object") return;
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

  function edgeList(box, title, list, end, pctTitle) {
    h("h4", null, title + " (" + list.length + ")", box);
    if (!list.length) {
      h("p", "hint", "none", box);
      return;
    }
    var ul = h("ul", "edges", null, box);
    list
      .slice()
      .sort(function (a, b) {
        return Math.abs(b.w) - Math.abs(a.w);
      })
      .slice(0, 8)
      .forEach(function (e) {
        var other = byId.get(e[end]);
        var li = h("li", null, null, ul);
        var b = h("button", isVisible(other) ? null : "hidden-node", null, li);
        b.type = "button";
        b.setAttribute("data-node-id", idOf(other));
        b.setAttribute("data-pct-input", String(e.pct));
        h("span", "w " + (e.w < 0 ? "neg" : "pos"), (e.w >= 0 ? "+" : "") + fmt(e.w), b);
        h("span", "pct " + (e.pct < 0 ? "neg" : "pos"), fmtPct(e.pct), b).title = pctTitle;
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
    var active = document.activeElement;
    var sig = JSON.stringify(q.supernodes);
    var typing = active && active.classList && active.classList.contains("sn-label-input") && ul.contains(active);
    if (typing && sig === ul.getAttribute("data-sig")) return; // keep the label being typed
    ul.setAttribute("data-sig", sig);
    clear(ul);
    q.supernodes.forEach(function (sn, index) {
      if (!Array.isArray(sn)) return;
      var li = h("li", "supernode-item", null, ul);
      li.setAttribute("data-index", String(index));
      var inp = h("input", "sn-label-input", null, li);
      inp.type = "text";
      inp.maxLength = 80;
      inp.value = String(sn[0]);
      inp.title = "Rename: type and press Enter";
      inp.setAttribute("aria-label", "supernode label");
      inp.addEventListener("keydown", function (evt) {
        if (evt.key === "Enter") inp.blur();
        if (evt.key === "Escape") {
          inp.value = String(sn[0]);
          inp.blur();
        }
      });
      inp.addEventListener("change", function () {
        if (!renameSupernode(index, inp.value)) inp.value = String(sn[0]);
      });
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

  // ---- the pinned-subgraph workspace ----
  // It shows the pinned nodes and every supernode (collapsed into one node with its members' links summed),
  // laid out in layers (embeddings at the bottom, logits on top) with the order in each layer chosen by
  // barycentre sweeps to cut crossings. Dragged positions are kept, as fractions of the panel, in qParams.sg_pos:
  // "ID:x:y;ID:x:y" (ID URL-encoded; a supernode's ID is "S:" and its first member's id).
  var wsWrap = document.getElementById("ws-wrap");
  var wsSvg = document.getElementById("ws-svg");
  var wsEdit = document.getElementById("ws-label-edit");
  var wsManual = parseSgPos(q.sg_pos);
  var wsAuto = { sig: null, pos: new Map() };
  var wsModel = { items: [], byKey: new Map(), itemOf: new Map(), links: [] };
  var wsPx = new Map();
  var wsSize = { w: 0, h: 0 };

  function parseSgPos(str) {
    var m = new Map();
    if (typeof str !== "string") return m;
    str.split(";").forEach(function (entry) {
      var b = entry.lastIndexOf(":");
      var a = b > 0 ? entry.lastIndexOf(":", b - 1) : -1;
      if (a <= 0) return;
      var x = num(entry.slice(a + 1, b));
      var y = num(entry.slice(b + 1));
      if (!isFinite(x) || !isFinite(y)) return;
      m.set(decode(entry.slice(0, a)), { x: clamp01(x), y: clamp01(y) });
    });
    return m;
  }

  function sgPosString() {
    var parts = [];
    wsManual.forEach(function (p, key) {
      parts.push(encodeURIComponent(key) + ":" + p.x.toFixed(3) + ":" + p.y.toFixed(3));
    });
    return parts.join(";");
  }

  function levelOf(n) {
    var k = kindOf(n);
    if (k === "embedding") return -1;
    if (k === "logit") return 1e6;
    var l = num(layerOf(n));
    return isFinite(l) ? l : 0;
  }

  function buildWorkspace() {
    var items = [];
    var byKey = new Map();
    var itemOf = new Map();
    function add(item) {
      var levels = item.members.map(function (id) {
        return levelOf(byId.get(id));
      });
      var sum = levels.reduce(function (a, b) {
        return a + b;
      }, 0);
      item.level = Math.round(sum / levels.length);
      item.pos =
        item.members.reduce(function (a, id) {
          return a + posOf(byId.get(id));
        }, 0) / item.members.length;
      items.push(item);
      byKey.set(item.key, item);
      item.members.forEach(function (id) {
        itemOf.set(id, item);
      });
    }
    q.supernodes.forEach(function (sn, index) {
      if (!Array.isArray(sn) || sn.length < 2) return;
      var members = sn.slice(1).filter(function (id) {
        return byId.has(id) && !itemOf.has(id);
      });
      if (!members.length) return;
      var key = "S:" + String(sn[1]);
      if (byKey.has(key)) key += "#" + index;
      add({ key: key, type: "super", index: index, label: String(sn[0]), members: members });
    });
    q.pinnedIds.forEach(function (id) {
      if (!byId.has(id) || itemOf.has(id) || byKey.has(id)) return;
      add({ key: id, type: "node", node: byId.get(id), members: [id] });
    });
    var agg = new Map();
    edges.forEach(function (e) {
      var a = itemOf.get(e.s);
      var b = itemOf.get(e.t);
      if (!a || !b || a === b) return;
      var k = a.key + "\u0000" + b.key;
      var r = agg.get(k);
      if (!r) {
        r = { src: a, tgt: b, w: 0, n: 0, pct: 0 };
        agg.set(k, r);
      }
      r.w += e.w;
      r.n += 1;
    });
    var links = [];
    agg.forEach(function (r) {
      var denom = r.tgt.members.reduce(function (s, id) {
        return s + (inTotal.get(id) || 0);
      }, 0);
      r.pct = denom > 0 ? r.w / denom : 0;
      links.push(r);
    });
    return { items: items, byKey: byKey, itemOf: itemOf, links: links };
  }

  // Layered layout: one row per level, ordered by token position, then barycentre sweeps up and down; the
  // ordering with the fewest crossings wins. Returns fractions of the drawing area (y 0 = top).
  function autoLayout(model, maxRows) {
    var levels = [];
    model.items.forEach(function (it) {
      if (levels.indexOf(it.level) < 0) levels.push(it.level);
    });
    levels.sort(function (a, b) {
      return a - b;
    });
    // one row per level while they fit the panel; else neighbouring layers share rows (embeddings and logits
    // keep theirs)
    var ends = levels.filter(function (l) {
      return l === -1 || l === 1e6;
    });
    var mid = levels.filter(function (l) {
      return ends.indexOf(l) < 0;
    });
    var midRows = Math.max(1, maxRows - ends.length);
    var rowOfLevel = new Map();
    var nRows = 0;
    if (levels[0] === -1) rowOfLevel.set(-1, nRows++);
    var midStart = nRows;
    mid.forEach(function (l, i) {
      var r = midStart + (mid.length <= midRows ? i : Math.floor((i * midRows) / mid.length));
      rowOfLevel.set(l, r);
      nRows = Math.max(nRows, r + 1);
    });
    if (levels[levels.length - 1] === 1e6) rowOfLevel.set(1e6, nRows++);
    var rows = [];
    for (var k = 0; k < nRows; k++) rows.push([]);
    var rowOf = new Map();
    model.items.forEach(function (it) {
      var r = rowOfLevel.get(it.level);
      rows[r].push(it);
      rowOf.set(it.key, r);
    });
    rows.forEach(function (r) {
      r.sort(function (a, b) {
        return a.pos - b.pos || (a.key < b.key ? -1 : a.key > b.key ? 1 : 0);
      });
    });
    var nb = new Map();
    model.items.forEach(function (it) {
      nb.set(it.key, []);
    });
    model.links.forEach(function (l) {
      nb.get(l.src.key).push(l.tgt.key);
      nb.get(l.tgt.key).push(l.src.key);
    });
    function coords() {
      var m = new Map();
      rows.forEach(function (r) {
        r.forEach(function (it, i) {
          m.set(it.key, (i + 0.5) / r.length);
        });
      });
      return m;
    }
    function sweep(up) {
      var order = rows.map(function (_, i) {
        return i;
      });
      if (!up) order.reverse();
      order.forEach(function (ri) {
        var c = coords();
        var bary = new Map();
        rows[ri].forEach(function (it) {
          var sum = 0;
          var cnt = 0;
          nb.get(it.key).forEach(function (other) {
            var ro = rowOf.get(other);
            if (up ? ro < ri : ro > ri) {
              sum += c.get(other);
              cnt += 1;
            }
          });
          bary.set(it.key, cnt ? sum / cnt : c.get(it.key));
        });
        rows[ri].sort(function (a, b) {
          return bary.get(a.key) - bary.get(b.key);
        });
      });
    }
    function crossings() {
      var c = coords();
      var segs = model.links.map(function (l) {
        return [c.get(l.src.key), rowOf.get(l.src.key), c.get(l.tgt.key), rowOf.get(l.tgt.key), l];
      });
      var count = 0;
      for (var i = 0; i < segs.length; i++) {
        for (var j = i + 1; j < segs.length; j++) {
          var a = segs[i];
          var b = segs[j];
          var la = a[4];
          var lb = b[4];
          if (la.src === lb.src || la.src === lb.tgt || la.tgt === lb.src || la.tgt === lb.tgt) continue;
          if (cross(a, b)) count += 1;
        }
      }
      return count;
    }
    function orient(ax, ay, bx, by, cx, cy) {
      var v = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax);
      return v > 1e-12 ? 1 : v < -1e-12 ? -1 : 0;
    }
    function cross(a, b) {
      var o1 = orient(a[0], a[1], a[2], a[3], b[0], b[1]);
      var o2 = orient(a[0], a[1], a[2], a[3], b[2], b[3]);
      var o3 = orient(b[0], b[1], b[2], b[3], a[0], a[1]);
      var o4 = orient(b[0], b[1], b[2], b[3], a[2], a[3]);
      return o1 * o2 < 0 && o3 * o4 < 0;
    }
    var canCount = model.links.length <= 400;
    var best = rows.map(function (r) {
      return r.slice();
    });
    var bestCount = canCount ? crossings() : 0;
    for (var iter = 0; iter < 6; iter++) {
      sweep(true);
      sweep(false);
      if (!canCount) continue;
      var c = crossings();
      if (c < bestCount) {
        bestCount = c;
        best = rows.map(function (r) {
          return r.slice();
        });
      }
    }
    if (canCount) rows = best;
    var out = new Map();
    var R = rows.length;
    rows.forEach(function (r, ri) {
      r.forEach(function (it, i) {
        out.set(it.key, { x: (i + 0.5) / r.length, y: R === 1 ? 0.5 : 1 - ri / (R - 1) });
      });
    });
    out.crossings = bestCount;
    return out;
  }

  function toPx(f) {
    return {
      x: WS_MX + f.x * Math.max(1, wsSize.w - 2 * WS_MX),
      y: WS_TOP + f.y * Math.max(1, wsSize.h - WS_TOP - WS_BOTTOM),
    };
  }

  function toFrac(x, y) {
    return {
      x: clamp01((x - WS_MX) / Math.max(1, wsSize.w - 2 * WS_MX)),
      y: clamp01((y - WS_TOP) / Math.max(1, wsSize.h - WS_TOP - WS_BOTTOM)),
    };
  }

  function renderWorkspace() {
    wsSize = { w: Math.max(wsWrap.clientWidth, 240), h: Math.max(wsWrap.clientHeight, 150) };
    wsSvg.setAttribute("width", wsSize.w);
    wsSvg.setAttribute("height", wsSize.h);
    wsSvg.setAttribute("viewBox", "0 0 " + wsSize.w + " " + wsSize.h);
    var model = buildWorkspace();
    wsModel = model;
    var sig =
      model.items
        .map(function (it) {
          return it.key + "=" + it.members.length;
        })
        .join("|") +
      "#" +
      model.links
        .map(function (l) {
          return l.src.key + ">" + l.tgt.key;
        })
        .join("|");
    var maxRows = Math.max(2, Math.floor((wsSize.h - WS_TOP - WS_BOTTOM) / WS_ROW) + 1);
    sig += "#" + maxRows;
    if (sig !== wsAuto.sig) wsAuto = { sig: sig, pos: autoLayout(model, maxRows) };
    wsPx = new Map();
    model.items.forEach(function (it) {
      wsPx.set(it.key, toPx(wsManual.get(it.key) || wsAuto.pos.get(it.key) || { x: 0.5, y: 0.5 }));
    });
    drawWsEdges();
    drawWsNodes();
    document.getElementById("ws-node-count").textContent = String(model.items.length);
    document.getElementById("ws-edge-count").textContent = String(model.links.length);
  }

  function wsSelected() {
    return state.selected ? wsModel.itemOf.get(state.selected) || null : null;
  }

  function wsMatches(l, it) {
    return (q.linkType !== "output" && l.tgt === it) || (q.linkType !== "input" && l.src === it);
  }

  function wsPath(a, b) {
    if (Math.abs(a.y - b.y) < 12) {
      var mx = (a.x + b.x) / 2;
      var my = Math.min(a.y, b.y) - 26 - Math.abs(a.x - b.x) * 0.08;
      return "M" + a.x + "," + a.y + " Q" + mx + "," + my + " " + b.x + "," + b.y;
    }
    var midY = (a.y + b.y) / 2;
    return "M" + a.x + "," + a.y + " C" + a.x + "," + midY + " " + b.x + "," + midY + " " + b.x + "," + b.y;
  }

  function drawWsEdges() {
    var g = document.getElementById("ws-edge-layer");
    clear(g);
    var selItem = wsSelected();
    var list = wsModel.links.slice();
    list.sort(function (a, b) {
      var ha = selItem && wsMatches(a, selItem) ? 1 : 0;
      var hb = selItem && wsMatches(b, selItem) ? 1 : 0;
      return ha - hb || Math.abs(a.pct) - Math.abs(b.pct);
    });
    list.forEach(function (l) {
      var st = edgeStyle(l.pct);
      var hot = selItem && wsMatches(l, selItem);
      el(
        "path",
        {
          class: "sg-edge " + (l.w < 0 ? "neg" : "pos") + (selItem ? (hot ? " hot" : " dim") : ""),
          d: wsPath(wsPx.get(l.src.key), wsPx.get(l.tgt.key)),
          stroke: st.color,
          "stroke-opacity": st.opacity,
          "stroke-width": (1.2 * st.width + 0.4).toFixed(2),
          "data-source": l.src.key,
          "data-target": l.tgt.key,
          "data-weight": String(l.w),
          "data-pct-input": String(l.pct),
          "data-links": String(l.n),
        },
        g
      );
    });
  }

  function wsLabels(n) {
    var k = kindOf(n);
    var base = label(n);
    var at = quote(visibleToken(tokenOf(n))) + "@" + posOf(n);
    if (k === "logit") {
      var prob = num(n.token_prob);
      return [quote(visibleToken(logitToken(n))), isFinite(prob) && prob > 0 ? (100 * prob).toFixed(1) + "%" : "logit"];
    }
    if (k === "embedding") return [quote(visibleToken(tokenOf(n))), "emb@" + posOf(n)];
    if (k === "error") return [base, "reconstruction error"];
    var main = editedClerp(n);
    if (main === null) main = n.clerp ? String(n.clerp) : base;
    return [main, (main !== base ? base + " \u00b7 " : "") + at];
  }

  function drawWsNodes() {
    var layer = document.getElementById("ws-node-layer");
    clear(layer);
    var selItem = wsSelected();
    if (!wsModel.items.length) {
      text(layer, "Shift-click nodes in the graph (or use Pin in the details) to build a subgraph here.", {
        class: "ws-empty",
        x: wsSize.w / 2,
        y: wsSize.h / 2,
      });
      return;
    }
    var room = new Map(); // horizontal room around each item: its nearest neighbour in the same row
    wsModel.items.forEach(function (it) {
      var p = wsPx.get(it.key);
      var best = wsSize.w;
      wsModel.items.forEach(function (other) {
        var o = wsPx.get(other.key);
        if (other !== it && Math.abs(o.y - p.y) < 30) best = Math.min(best, Math.abs(o.x - p.x));
      });
      room.set(it.key, best);
    });
    wsModel.items.forEach(function (it) {
      var p = wsPx.get(it.key);
      var chars = Math.max(6, Math.floor((room.get(it.key) - 6) / 6.4));
      var g;
      if (it.type === "super") {
        g = el("g", { class: "sg-node super", transform: "translate(" + p.x + "," + p.y + ")" }, layer);
        g.setAttribute("data-sg-id", it.key);
        g.setAttribute("data-supernode-index", String(it.index));
        g.setAttribute("data-members", String(it.members.length));
        g.setAttribute("data-label", it.label);
        var lbl = truncate(it.label, Math.min(28, chars));
        var w = Math.max(80, Math.min(230, lbl.length * 6.9 + 48));
        el("rect", { class: "shape", x: -w / 2, y: -13, width: w, height: 26, rx: 13 }, g);
        text(g, lbl, { class: "sg-label", x: -10, y: 4 });
        text(g, "\u00d7" + it.members.length, { class: "sg-count", x: w / 2 - 16, y: 4 });
        el("title", null, g).textContent =
          it.label + " \u2014 " + it.members.length + " nodes (click to rename, drag to move)";
        if (selItem === it) {
          el("rect", { class: "ring selected", x: -w / 2 - 4, y: -17, width: w + 8, height: 34, rx: 17 }, g);
        }
        var u = el("g", { class: "sg-ungroup", transform: "translate(" + (w / 2 - 2) + ",-13)" }, g);
        u.setAttribute("data-index", String(it.index));
        el("circle", { r: 7 }, u);
        text(u, "\u00d7", { y: 3.6 });
        el("title", null, u).textContent = "Ungroup";
        return;
      }
      var n = it.node;
      g = el("g", { class: nodeClass(n, it.key, "sg-node"), transform: "translate(" + p.x + "," + p.y + ")" }, layer);
      g.setAttribute("data-sg-id", it.key);
      g.setAttribute("data-node-id", it.key);
      var r = drawShape(g, n, 1.25);
      el("rect", { class: "hit", x: -40, y: -r - 4, width: 80, height: 2 * r + 34 }, g); // labels grab too
      var labels = wsLabels(n);
      text(g, truncate(labels[0], Math.min(26, chars)), { class: "sg-label", y: r + 13 });
      text(g, truncate(labels[1], Math.min(32, chars + 2)), { class: "sg-sub", y: r + 25 });
      el("title", null, g).textContent = labels[0] + "\n" + labels[1] + "\n" + it.key;
      el("circle", { class: "ring pinned", r: (r + 3.2).toFixed(2) }, g);
      if (selItem === it) el("circle", { class: "ring selected", r: (r + 5.8).toFixed(2) }, g);
    });
  }

  // dragging (pointer events); a press that does not move is a click
  var drag = null;
  wsSvg.addEventListener("pointerdown", function (evt) {
    if (editing !== null) endEdit(true);
    if (evt.button !== 0 || (evt.target.closest && evt.target.closest(".sg-ungroup"))) return;
    var g = evt.target.closest ? evt.target.closest(".sg-node") : null;
    if (!g) return;
    var key = g.getAttribute("data-sg-id");
    var p = wsPx.get(key);
    if (!p) return;
    drag = { key: key, g: g, id: evt.pointerId, x0: evt.clientX, y0: evt.clientY, px: p.x, py: p.y, moved: false };
    try {
      g.setPointerCapture(evt.pointerId);
    } catch (err) {
      /* capture is a nicety */
    }
    tip.hidden = true;
    evt.preventDefault();
  });
  wsSvg.addEventListener("pointermove", function (evt) {
    if (!drag || evt.pointerId !== drag.id) return;
    var dx = evt.clientX - drag.x0;
    var dy = evt.clientY - drag.y0;
    if (!drag.moved && dx * dx + dy * dy < 16) return;
    drag.moved = true;
    var f = toFrac(drag.px + dx, drag.py + dy);
    wsManual.set(drag.key, { x: Math.round(f.x * 1000) / 1000, y: Math.round(f.y * 1000) / 1000 });
    var p = toPx(wsManual.get(drag.key));
    wsPx.set(drag.key, p);
    drag.g.setAttribute("transform", "translate(" + p.x + "," + p.y + ")");
    drawWsEdges();
  });
  function endDrag(evt, cancelled) {
    if (!drag || evt.pointerId !== drag.id) return;
    var d = drag;
    drag = null;
    try {
      d.g.releasePointerCapture(evt.pointerId);
    } catch (err) {
      /* already released */
    }
    if (d.moved) {
      q.sg_pos = sgPosString();
      renderWorkspace();
      scheduleHash();
      return;
    }
    if (cancelled) return;
    var it = wsModel.byKey.get(d.key);
    if (!it) return;
    if (it.type === "super") startEdit(it);
    else if (evt.shiftKey) togglePin(it.key);
    else select(it.key);
  }
  wsSvg.addEventListener("pointerup", function (evt) {
    endDrag(evt, false);
  });
  wsSvg.addEventListener("pointercancel", function (evt) {
    endDrag(evt, true);
  });
  wsSvg.addEventListener("click", function (evt) {
    var u = evt.target.closest ? evt.target.closest(".sg-ungroup") : null;
    if (u) ungroup(Number(u.getAttribute("data-index")));
  });
  wsSvg.addEventListener("mouseover", function (evt) {
    if (drag) return;
    var e = evt.target.closest ? evt.target.closest(".sg-edge") : null;
    if (!e) {
      tip.hidden = true;
      return;
    }
    var a = wsModel.byKey.get(e.getAttribute("data-source"));
    var b = wsModel.byKey.get(e.getAttribute("data-target"));
    if (!a || !b) return;
    showTip(evt, [
      ["t", itemName(a) + " \u2192 " + itemName(b)],
      [
        "m",
        "weight " + fmt(e.getAttribute("data-weight")) + " \u00b7 " +
          fmtPct(num(e.getAttribute("data-pct-input"))) + " of the input",
      ],
    ]);
  });
  wsSvg.addEventListener("mouseleave", function () {
    tip.hidden = true;
  });

  function itemName(it) {
    return it.type === "super" ? it.label + " (" + it.members.length + ")" : label(it.node);
  }

  // in-place renaming of a supernode
  var editing = null;
  function startEdit(it) {
    var p = wsPx.get(it.key);
    editing = it.index;
    wsEdit.hidden = false;
    wsEdit.value = it.label;
    wsEdit.style.left = Math.max(4, p.x - 100) + "px";
    wsEdit.style.top = Math.max(4, p.y - 14) + "px";
    wsEdit.focus();
    wsEdit.select();
  }
  function endEdit(save) {
    if (editing === null) return;
    var index = editing;
    editing = null;
    wsEdit.hidden = true;
    if (save) renameSupernode(index, wsEdit.value);
  }
  wsEdit.addEventListener("keydown", function (evt) {
    if (evt.key === "Enter") endEdit(true);
    else if (evt.key === "Escape") {
      evt.stopPropagation();
      endEdit(false);
    }
  });
  wsEdit.addEventListener("blur", function () {
    endEdit(true);
  });

  // ---- actions ----
  function select(id) {
    state.selected = id && byId.has(String(id)) ? String(id) : null;
    q.clickedId = state.selected || "";
    render();
  }

  function togglePin(id) {
    id = String(id);
    var i = q.pinnedIds.indexOf(id);
    if (i >= 0) q.pinnedIds.splice(i, 1);
    else q.pinnedIds.push(id);
    render();
  }

  function toggleGroupSel(id) {
    id = String(id);
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

  function renameSupernode(index, labelText) {
    var name = String(labelText === undefined || labelText === null ? "" : labelText).trim();
    var sn = q.supernodes[index];
    if (!name || !Array.isArray(sn)) return false;
    sn[0] = name;
    render();
    return true;
  }

  // A user label for a neuron (every position of it: circuit-tracer keys labels by `feature`).
  function setClerp(id, labelText) {
    var n = byId.get(String(id));
    if (!n || kindOf(n) !== "neuron" || n.feature === undefined || n.feature === null) return false;
    var name = String(labelText === undefined || labelText === null ? "" : labelText).trim();
    var key = String(n.feature);
    if (!name || name === String(n.clerp || "")) clerpEdits.delete(key);
    else clerpEdits.set(key, name);
    if (q.clerps !== undefined || clerpEdits.size) q.clerps = clerpArray();
    render();
    return true;
  }

  function setLinkType(t) {
    q.linkType = linkTypeOf(t);
    render();
  }

  function relayout() {
    wsManual = new Map();
    q.sg_pos = "";
    wsAuto = { sig: null, pos: new Map() };
    render();
  }

  function clearPins() {
    q.pinnedIds.splice(0, q.pinnedIds.length);
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
    a.download = (slug.replace(/[^\w.-]+/g, "_") || "graph") + ".json";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () {
      URL.revokeObjectURL(url);
    }, 2000);
  }

  // ---- the graphs of the other prompts of a run ----
  var siblings = Array.isArray(siblingsData)
    ? siblingsData.filter(function (s) {
        return s && typeof s === "object" && typeof s.html === "string" && s.html;
      })
    : [];

  function fileName(path) {
    var p = decode(String(path));
    return p.slice(p.lastIndexOf("/") + 1);
  }

  function relativeHref(name) {
    return String(name)
      .split("/")
      .map(function (seg) {
        return seg === "." || seg === ".." ? seg : encodeURIComponent(seg);
      })
      .join("/");
  }

  // The hash another graph opens with: the view settings, not this graph's node ids.
  function carriedHash() {
    var parts = [];
    if (Math.abs(state.threshold - defaultThreshold) > 1e-12) {
      parts.push("threshold=" + encodeURIComponent(String(state.threshold)));
    }
    parts.push("link=" + encodeURIComponent(q.linkType));
    return "#" + parts.join("&");
  }

  function setupSiblings() {
    var sel = document.getElementById("graph-select");
    if (!siblings.length) return;
    sel.hidden = false;
    var here = fileName(location.pathname);
    var current = -1;
    siblings.forEach(function (s, i) {
      if (current < 0 && slug && String(s.slug) === slug) current = i;
    });
    siblings.forEach(function (s, i) {
      if (current < 0 && fileName(s.html) === here) current = i;
    });
    if (current < 0) {
      var own = h("option", null, "(this graph) " + truncate(slug || "attribution graph", 60), sel);
      own.value = "";
    }
    siblings.forEach(function (s, i) {
      var prompt = typeof s.prompt === "string" && s.prompt ? s.prompt : String(s.slug || s.html);
      var o = h("option", null, i + 1 + ". " + truncate(visibleToken(prompt).replace(/\u2423/g, " "), 80), sel);
      o.value = String(i);
      o.title = prompt;
      o.setAttribute("data-html", s.html);
    });
    sel.value = current >= 0 ? String(current) : "";
    sel.addEventListener("change", function () {
      var i = sel.value === "" ? -1 : Number(sel.value);
      if (i < 0 || i === current || !siblings[i]) return;
      location.href = relativeHref(siblings[i].html) + carriedHash();
    });
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
    else if (k === "error") lines.push(["m", "reconstruction error \u00b7 infl " + fmt(n.influence)]);
    else {
      var m = "act " + fmt(n.activation) + " \u00b7 attr " + fmt(n.attribution) + " \u00b7 infl " + fmt(n.influence);
      lines.push(["m", m]);
    }
    var c = clerpOf(n);
    if (c && c !== label(n)) lines.push(["l", c]);
    var top = topTokens(n);
    if (Array.isArray(top) && top.length) {
      lines.push(["m", "promotes " + top.slice(0, 5).map(String).join(" | ")]);
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
        [
          "m",
          "weight " + fmt(edgeEl.getAttribute("data-weight")) + " \u00b7 " +
            fmtPct(num(edgeEl.getAttribute("data-pct-input"))) + " of the target's input",
        ],
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
  function setSlider() {
    slider.max = String(Math.max(defaultThreshold, state.threshold));
    slider.value = String(state.threshold);
    sliderValue.textContent = state.threshold.toFixed(3);
  }
  function onThreshold() {
    state.threshold = Number(slider.value);
    q.pruningThreshold = state.threshold;
    sliderValue.textContent = state.threshold.toFixed(3);
    render();
  }
  // Big graphs redraw at most once a frame while the slider is dragged; small ones at once.
  var big = nodes.length + edges.length > 5000;
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

  LINK_TYPES.forEach(function (t) {
    document.getElementById("link-" + t).addEventListener("change", function (evt) {
      if (evt.target.checked) setLinkType(t);
    });
  });
  document.getElementById("relayout").addEventListener("click", relayout);
  document.getElementById("clear-pins").addEventListener("click", clearPins);
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
    var t = evt.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "SELECT")) return;
    state.groupSel.clear();
    select(null);
  });
  window.addEventListener("hashchange", function () {
    if (location.hash === lastHash) return;
    applyHash(readHash());
    setSlider();
    render();
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
    applyHash(readHash());
    setSlider();
    drawHeader();
    setupSiblings();
    layout = buildLayout();
    drawGrid();
    render();
    writeHashNow();
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
    renameSupernode: renameSupernode,
    setClerp: setClerp,
    setLinkType: setLinkType,
    relayout: relayout,
    clearPins: clearPins,
    setThreshold: function (v) {
      slider.value = String(v);
      onThreshold();
    },
    flushHash: function () {
      writeHashNow();
      return location.hash;
    },
    state: function () {
      return {
        threshold: state.threshold,
        defaultThreshold: defaultThreshold,
        sliderMin: Number(slider.min),
        sliderMax: Number(slider.max),
        selected: state.selected,
        linkType: q.linkType,
        pinned: q.pinnedIds.slice(),
        hash: location.hash,
      };
    },
    workspace: function () {
      return {
        nodes: wsModel.items.map(function (it) {
          var p = wsPx.get(it.key);
          return {
            key: it.key,
            type: it.type,
            label: it.type === "super" ? it.label : wsLabels(it.node)[0],
            members: it.members.slice(),
            x: p.x,
            y: p.y,
          };
        }),
        links: wsModel.links.map(function (l) {
          return { source: l.src.key, target: l.tgt.key, weight: l.w, pctInput: l.pct, count: l.n };
        }),
        crossings: wsAuto.pos.crossings,
      };
    },
  };
})();
