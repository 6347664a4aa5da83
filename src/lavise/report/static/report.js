/* lavise report: draws the overview, one view per filter and the analysis views from
 * window.LAVISE_REPORT (data.js). Every string from the data goes into the page as text
 * (textContent, attributes set one by one), never parsed as HTML; links are built from
 * numbers only. Views are chosen by the URL's hash: #overview, #filter-12, #evaluation,
 * #groups, so the back button and bookmarks work from file:// too.
 */
(function () {
  "use strict";

  var D = window.LAVISE_REPORT;
  var app = document.getElementById("app");
  var BATCH = 120;      // cards drawn at once; more are drawn while scrolling
  var TABLE_ROWS = 500; // rows of the long tables on the analysis views
  var state = { query: "", sort: "filter", shown: [], drawn: 0, scroll: 0, wanted: 0 };
  var observer = null;
  var firstCards = false;
  var held = [];  // images of the first view get their files after its words are on screen

  // --- small DOM helpers ------------------------------------------------------------

  function el(tag, props) {
    var node = document.createElement(tag);
    if (props) {
      Object.keys(props).forEach(function (key) {
        var value = props[key];
        if (value === null || value === undefined) return;
        if (key === "text") node.textContent = String(value);
        else if (key === "class") node.className = value;
        else node.setAttribute(key, String(value));
      });
    }
    for (var i = 2; i < arguments.length; i++) {
      var child = arguments[i];
      if (child === null || child === undefined) continue;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function fmt(value, digits) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(digits === undefined ? 2 : digits);
  }

  function filterLink(n, label) {
    return el("a", { href: "#filter-" + Number(n), "data-link-filter": Number(n) }, label === undefined ? "Filter " + Number(n) : label);
  }

  function image(entry, size, lazy) {
    if (!entry.src) {
      return el("div", { class: "no-image", title: entry.name, text: "image not available" });
    }
    var img = el("img", { alt: entry.name, title: entry.name, width: size, height: size, decoding: "async" });
    if (lazy) img.loading = "lazy";
    if (held) held.push([img, entry.src]);
    else img.src = entry.src;
    return img;
  }

  function figure(entry, caption) {
    return el("figure", null, image(entry, 128, true), el("figcaption", { text: caption }));
  }

  function table(headers, rows) {
    var head = el("tr");
    headers.forEach(function (h) { head.appendChild(el("th", { text: h })); });
    var body = el("tbody");
    rows.forEach(function (cells) {
      var tr = el("tr");
      cells.forEach(function (cell) {
        if (cell instanceof Node) tr.appendChild(el("td", null, cell));
        else if (typeof cell === "number" || cell === null) {
          tr.appendChild(el("td", { class: "num", text: fmt(cell) }));
        }
        else tr.appendChild(el("td", { text: cell }));
      });
      body.appendChild(tr);
    });
    return el("table", null, el("thead", null, head), body);
  }

  function show() {
    var parts = Array.prototype.filter.call(arguments, function (part) { return part !== null && part !== undefined; });
    app.replaceChildren.apply(app, parts);
  }

  function section(title) {
    var node = el("section", null, el("h2", { text: title }));
    for (var i = 1; i < arguments.length; i++) if (arguments[i]) node.appendChild(arguments[i]);
    return node;
  }

  // --- data ---------------------------------------------------------------------------

  var byFilter = new Map();
  var order = new Map(); // filter -> position in D.filters
  if (D) {
    D.filters.forEach(function (f, i) {
      f.search = f.words.map(function (w) { return w.word.toLowerCase(); });
      byFilter.set(f.filter, f);
      order.set(f.filter, i);
    });
  }

  // How many top images agree on a word: its first choices (lavise 0.3 on), or before
  // 0.3, when explanations had no "first", the top word's count.
  function agreement(f) {
    if (!f.words.length) return -1;
    if (f.words[0].first === null) return f.words[0].count;
    return Math.max.apply(null, f.words.map(function (w) { return w.first; }));
  }

  var SORTS = {
    filter: function (a, b) { return a.filter - b.filter; },
    count: function (a, b) { return agreement(b) - agreement(a) || a.filter - b.filter; },
    confidence: function (a, b) {
      var x = a.confidence === null ? -Infinity : a.confidence, y = b.confidence === null ? -Infinity : b.confidence;
      return y - x || a.filter - b.filter;
    },
    score: function (a, b) {
      var x = a.score === null ? -Infinity : a.score, y = b.score === null ? -Infinity : b.score;
      return y - x || a.filter - b.filter;
    }
  };

  function matching(query) {
    var q = query.trim().toLowerCase();
    var list = q ? D.filters.filter(function (f) {
      return f.search.some(function (w) { return w.indexOf(q) !== -1; });
    }) : D.filters.slice();
    return list.sort(SORTS[state.sort] || SORTS.filter);
  }

  // --- overview ---------------------------------------------------------------------

  function about(rows) {
    var list = el("dl", { class: "about" });
    rows.forEach(function (row) { list.appendChild(el("dt", { text: row[0] })); list.appendChild(el("dd", { text: row[1] })); });
    return list;
  }

  function card(f) {
    var head = el("div", { class: "card-head" }, el("span", { class: "num", text: "Filter " + f.filter }));
    if (f.score !== null) head.appendChild(el("span", { class: "score", text: "recall@5 " + fmt(f.score) }));
    if (f.confidence !== null) head.appendChild(el("span", { class: "confidence", text: "confidence " + fmt(f.confidence) }));
    if (!f.active) head.appendChild(el("span", { class: "badge", text: "inactive" }));
    else if (!f.named) head.appendChild(el("span", { class: "badge", text: "no confident name" }));
    var words = el("ol", { class: f.named ? "words" : "words unnamed" });
    f.words.slice(0, 5).forEach(function (w) {
      words.appendChild(el("li", null, el("span", { class: "word", text: w.word }), el("span", { class: "count", text: "(" + (w.first === null ? w.count : w.first) + ")" })));
    });
    if (!f.words.length) words.appendChild(el("li", { class: "muted", text: f.active ? "no words" : "never active on the target images" }));
    var strip = el("div", { class: "strip" });
    f.images.slice(0, 5).forEach(function (entry) { if (entry.src) strip.appendChild(image(entry, 40, true)); });
    return el("a", { class: "card", href: "#filter-" + Number(f.filter), "data-filter": Number(f.filter) }, head, words, strip);
  }

  function drawMore(grid, upTo) {
    var end = Math.min(state.shown.length, Math.max(state.drawn + BATCH, upTo || 0));
    var fragment = document.createDocumentFragment();
    for (var i = state.drawn; i < end; i++) fragment.appendChild(card(state.shown[i]));
    grid.appendChild(fragment);
    state.drawn = end;
  }

  function drawGrid(upTo) {
    var grid = document.getElementById("grid");
    var count = document.getElementById("count");
    state.shown = matching(state.query);
    state.drawn = 0;
    grid.replaceChildren();
    drawMore(grid, upTo);
    var total = D.filters.length;
    count.textContent = state.query.trim()
      ? state.shown.length + " of " + total + " filters have a word containing “" + state.query.trim() + "”"
      : total + " filters";
  }

  function showOverview() {
    document.title = D.title + " — lavise report";
    var description = about(D.about);

    var search = el("input", { id: "search", type: "search", placeholder: "search words…", "aria-label": "search words" });
    search.value = state.query;
    var sort = el("select", { id: "sort", "aria-label": "sort filters" },
      el("option", { value: "filter", text: "sort by filter" }),
      el("option", { value: "count", text: "sort by agreement of top images" }));
    if (D.filters.some(function (f) { return f.confidence !== null; }))
      sort.appendChild(el("option", { value: "confidence", text: "sort by confidence" }));
    if (D.score_name) sort.appendChild(el("option", { value: "score", text: "sort by evaluation score, " + D.score_name }));
    sort.value = state.sort;
    var jumpInput = el("input", { id: "jump-input", type: "number", min: 0, step: 1, placeholder: "filter #", "aria-label": "filter number" });
    var jump = el("form", { id: "jump" }, jumpInput, el("button", { type: "submit", text: "open" }));
    var note = el("span", { id: "jump-note", class: "note" });
    var grid = el("div", { id: "grid", class: "grid" });
    var sentinel = el("div", { class: "sentinel" });

    show(
      el("h1", { text: "Filters of " + D.layer + " (" + D.model + ", method " + D.method + ")" }),
      description,
      el("div", { class: "controls" }, search, sort, jump, note),
      el("p", { id: "count", class: "muted" }),
      grid,
      sentinel
    );

    search.addEventListener("input", function () { state.query = search.value; drawGrid(); });
    sort.addEventListener("change", function () { state.sort = sort.value; drawGrid(); });
    jump.addEventListener("submit", function (event) {
      event.preventDefault();
      var n = Number(jumpInput.value);
      if (jumpInput.value !== "" && byFilter.has(n)) location.hash = "#filter-" + n;
      else note.textContent = "no filter " + jumpInput.value + " (filters " + D.filters[0].filter + "–" + D.filters[D.filters.length - 1].filter + ")";
    });

    drawGrid(state.wanted);
    if (observer) observer.disconnect();
    observer = new IntersectionObserver(function (entries) {
      if (entries[0].isIntersecting && state.drawn < state.shown.length) drawMore(grid);
    }, { rootMargin: "800px" });
    observer.observe(sentinel);
    window.scrollTo(0, state.scroll);
    if (!firstCards) {  // for benchmarks/report_scale.py
      firstCards = true;
      performance.mark("lavise-first-cards");
    }
  }

  // --- one filter ---------------------------------------------------------------------

  function showFilter(n) {
    var f = byFilter.get(n);
    if (!f) {
      show(el("h1", { text: "No filter " + n }), el("p", null, el("a", { href: "#overview", text: "back to the overview" })));
      return;
    }
    document.title = "Filter " + n + " — " + D.title;
    var i = order.get(n);
    var pager = el("div", { class: "pager" }, el("a", { href: "#overview", text: "← overview" }));
    if (i > 0) pager.appendChild(filterLink(D.filters[i - 1].filter, "‹ filter " + D.filters[i - 1].filter));
    if (i < D.filters.length - 1) pager.appendChild(filterLink(D.filters[i + 1].filter, "filter " + D.filters[i + 1].filter + " ›"));

    var heading = el("h1", { id: "filter-title", text: "Filter " + n + " of " + D.layer });
    var facts = el("p", { class: "muted", text: "threshold T_u = " + fmt(f.threshold, 4) + (f.score !== null ? " · " + D.score_name + " " + fmt(f.score) : "")
      + (f.confidence !== null ? " · confidence that the first word is right " + fmt(f.confidence) : "")
      + (f.firing_images !== null ? " · fires on " + f.firing_images + " of its " + f.top_image_count + " top images, whose words count" : "")
      + (f.label !== null ? " · the reference annotations' label: " + f.label + " (IoU " + fmt(f.label_iou, 3) + ")" : "") });
    var trust = f.active && !f.named
      ? el("p", { class: "warning", text: "No confident name: the words below are only the nearest candidates; "
                                          + "filters this unsure were often wrong on the reference data." })
      : null;

    var maxCount = Math.max.apply(null, f.words.map(function (w) { return w.count; }).concat([1]));
    var words = f.words.length
      ? table(["word", "nearest on", "among nearest", ""], f.words.map(function (w) {
          var bar = el("div", { class: "bar" });
          bar.style.width = (100 * w.count / maxCount).toFixed(1) + "%";
          return [w.word, el("span", { class: "int", text: w.first === null ? "–" : String(w.first) }),
                  el("span", { class: "int", text: String(w.count) }), bar];
        }))
      : el("p", { class: "muted", text: f.active ? "No words." : "Never active on the target images: no words." });
    if (f.words.length) words.id = "words";

    var images = el("div", { id: "images", class: "images" });
    f.images.forEach(function (entry, rank) { images.appendChild(figure(entry, (rank + 1) + ". " + entry.name)); });

    show(
      pager, heading, facts, trust,
      section("Words, by how many of the top images gave them", words),
      section("Top images, the filter's region above T_u left bright", images),
      f.evaluation ? evaluationPanel(f.evaluation) : null,
      f.groups ? groupsPanel(f.groups) : null
    );
    window.scrollTo(0, 0);
  }

  function evaluationPanel(e) {
    var parts = el("div", { id: "filter-evaluation" });
    parts.appendChild(el("p", null, "NetDissect label: ",
      e.netdissect ? el("strong", { text: e.netdissect.concept }) : el("span", { class: "muted", text: "none" }),
      e.netdissect ? " (IoU " + fmt(e.netdissect.iou, 3) + ")" : null));
    parts.appendChild(e.ground_truth.length
      ? table(["ground-truth concept", "IoU"], e.ground_truth.slice(0, 10).map(function (g) { return [g.concept, g.iou]; }))
      : el("p", { class: "muted", text: "No ground-truth concept reaches the IoU cut-off." }));
    if (e.methods.length) {
      parts.appendChild(el("h3", { text: "Words of each method against the ground truth" }));
      parts.appendChild(table(["method", "words", "recall@5", "recall@10", "recall@20", "precision@1"], e.methods.map(function (m) {
        return [m.method, m.words.join(", "), m["recall@5"], m["recall@10"], m["recall@20"], m["precision@1"]];
      })));
    }
    return section("Evaluation", parts);
  }

  function groupsPanel(g) {
    var parts = el("div", { id: "filter-groups" });
    parts.appendChild(el("p", { text: "Ranked " + g.rank + " of " + D.groups.ranking.length + " by difference between groups: difference " +
      fmt(g.difference, 3) + (g.ci ? ", 95% CI [" + fmt(g.ci[0], 3) + ", " + fmt(g.ci[1], 3) + "]" : "") +
      ", p = " + fmt(g.p_value, 4) + ", q = " + fmt(g.q_value, 4) + "." }));
    if (g.words.length) parts.appendChild(el("p", { text: "Words: " + g.words.join(", ") }));
    parts.appendChild(table(["group", "qualified images", "share"], g.groups.map(function (x) {
      return [x.group, x.qualified === null || x.qualified === undefined ? "–" : String(x.qualified), x.share];
    })));
    g.groups.forEach(function (x) {
      if (!x.examples.length) return;
      var strip = el("div", { class: "examples" });
      x.examples.forEach(function (entry) { strip.appendChild(figure(entry, entry.name)); });
      parts.appendChild(el("h3", { text: "Examples from " + x.group }));
      parts.appendChild(strip);
    });
    return section("Group comparison", parts);
  }

  // --- analysis views ---------------------------------------------------------------

  function plot(src, label) {
    return src ? el("img", { class: "plot", src: src, alt: label }) : el("p", { class: "muted", text: "No plot was written." });
  }

  function showEvaluation() {
    var e = D.evaluation;
    document.title = "Evaluation — " + D.title;
    var methods = table(["method", "precision@1", "recall@5", "recall@10", "recall@20", "F1@5", "filters", "seen precision@1",
                         "seen recall@5", "unseen recall@5", "only unseen ground truth", "lenient recall@5", "confidence AUROC",
                         "named", "precision@1 of named"],
      e.methods.map(function (m) {
        return [m.method, m["precision@1"], m["recall@5"], m["recall@10"], m["recall@20"], m["f1@5"],
          m.filters === null || m.filters === undefined ? "–" : String(m.filters), m["seen precision@1"], m["seen recall@5"],
          m["unseen recall@5"], m["unseen only"], m["lenient recall@5"], m["confidence auroc"], m["named"],
          m["precision@1 named"]];
      }));
    methods.id = "evaluation-methods";
    var scored = D.filters.filter(function (f) { return f.evaluation; }).sort(SORTS.score);
    var rows = scored.slice(0, TABLE_ROWS).map(function (f) {
      var ev = f.evaluation, own = ev.methods.filter(function (m) { return m.method === e.score_method; })[0];
      return [filterLink(f.filter), f.score, ev.netdissect ? ev.netdissect.concept : "–",
        ev.ground_truth.length ? ev.ground_truth[0].concept : "–", own ? own.words.slice(0, 5).join(", ") : "–"];
    });
    show(
      el("h1", { text: "Evaluation against ground-truth concepts" }),
      e.dataset.length ? about(e.dataset) : null,
      section("Methods", methods),
      section("Plot", plot(e.plot, "evaluation plot")),
      section("Filters by " + D.score_name + (scored.length > TABLE_ROWS ? " (first " + TABLE_ROWS + " of " + scored.length + ")" : ""),
        table(["filter", D.score_name, "NetDissect label", "best ground truth", "words"], rows))
    );
    window.scrollTo(0, 0);
  }

  function showGroups() {
    var g = D.groups;
    document.title = "Group comparison — " + D.title;
    var groups = table(["group", "images"], g.groups.map(function (x) { return [x.name, x.images === null || x.images === undefined ? "–" : String(x.images)]; }));
    groups.id = "groups-table";
    var names = g.groups.map(function (x) { return x.name; });
    var rows = g.ranking.slice(0, TABLE_ROWS).map(function (n, i) {
      var f = byFilter.get(n), entry = f && f.groups;
      var shares = names.map(function (name) {
        var hit = entry ? entry.groups.filter(function (x) { return x.group === name; })[0] : null;
        return hit ? hit.share : null;
      });
      return [String(i + 1), filterLink(n), entry ? entry.words.slice(0, 5).join(", ") : "–"].concat(shares,
        [entry ? entry.difference : null, entry && entry.ci ? "[" + fmt(entry.ci[0], 3) + ", " + fmt(entry.ci[1], 3) + "]" : "–", entry ? entry.q_value : null]);
    });
    var ranking = table(["rank", "filter", "words"].concat(names.map(function (x) { return "share " + x; }), ["difference", "95% CI", "q"]), rows);
    var concepts = table(["word", "filters", "score", "more in"], g.concepts.map(function (c) {
      var links = el("span");
      c.filters.forEach(function (n, i) { if (i) links.appendChild(document.createTextNode(", ")); links.appendChild(filterLink(n, String(n))); });
      return [c.word, links, c.score, c.direction];
    }));
    show(
      el("h1", { text: "Group comparison" }),
      section("Groups", groups),
      section("Chart", plot(g.plot, "group comparison chart")),
      section("Filters, most different first" + (g.ranking.length > TABLE_ROWS ? " (first " + TABLE_ROWS + " of " + g.ranking.length + ")" : ""), ranking),
      section("Concepts", concepts)
    );
    window.scrollTo(0, 0);
  }

  // --- routing ----------------------------------------------------------------------

  function drawNav(current) {
    var nav = document.getElementById("nav");
    var links = [["overview", "Overview"]];
    if (D.evaluation) links.push(["evaluation", "Evaluation"]);
    if (D.groups) links.push(["groups", "Groups"]);
    nav.replaceChildren.apply(nav, links.map(function (l) {
      var a = el("a", { href: "#" + l[0], text: l[1] });
      if (l[0] === current) a.setAttribute("aria-current", "page");
      return a;
    }));
  }

  var onOverview = false;

  function route() {
    var hash = location.hash;
    var match = /^#filter-(\d+)$/.exec(hash);
    if (onOverview) { state.scroll = window.scrollY; state.wanted = state.drawn; }
    onOverview = false;
    if (match) { drawNav(null); showFilter(Number(match[1])); }
    else if (hash === "#evaluation" && D.evaluation) { drawNav("evaluation"); showEvaluation(); }
    else if (hash === "#groups" && D.groups) { drawNav("groups"); showGroups(); }
    else { drawNav("overview"); onOverview = true; showOverview(); }
  }

  if (!D) {
    show(el("p", { class: "note", text: "data.js did not load: keep it beside index.html." }));
    return;
  }
  window.addEventListener("hashchange", route);
  route();
  requestAnimationFrame(function () {
    setTimeout(function () {  // the first view is painted: now load its images
      performance.mark("lavise-painted");
      var pending = held;
      held = null;
      pending.forEach(function (pair) { pair[0].src = pair[1]; });
    }, 0);
  });
})();
