"""The HTML report in a real browser: headless Chromium driven by Playwright.

Uses Debian's ``chromium`` package (``.ci/run`` installs it); these tests fail, rather
than skip, when it is missing. The report is opened from file:// and from a local HTTP
server; data strings that look like HTML must show as text and never run.
"""

from __future__ import annotations

import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lavise.explain import explain
from lavise.report import write_report
from lavise.settings import ExplainSettings

pytestmark = pytest.mark.filterwarnings("ignore:.*reference concepts are not in the vocabulary")

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--headless", "--disable-gpu"]
QUOTED = "it's \"quoted\" <img src=x onerror=alert(2)>.png"
SCRIPT_WORD = "<script>alert(1)</script>"
NETDISSECT = "<img src=x onerror=alert(3)>"
MODEL = "tiny<script>alert(4)</script>"
GROUP = '<b onmouseover="alert(5)">outdoor</b>'


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium), as .ci/run does.")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is missing: pip install '.[test]'.")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield launched
        launched.close()


class Watched:
    """A page that records console errors, page errors and dialogs (alert() calls)."""

    def __init__(self, browser) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 1000})
        self.problems: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("dialog", self._dialog)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def cards(self) -> list[int]:
        return [int(n) for n in self.page.eval_on_selector_all("#grid .card", "cs => cs.map(c => c.dataset.filter)")]

    def all_images_loaded(self, selector: str, size: int) -> bool:
        self.page.wait_for_function(
            "([s, n]) => { const imgs = [...document.querySelectorAll(s)];"
            " imgs.forEach(i => i.loading = 'eager');"
            " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth === n); }",
            arg=[selector, size], timeout=10_000,
        )
        return True


@pytest.fixture
def report(tmp_path, tiny_run, tiny_model, targets, compute) -> Path:
    """A report of an explained run whose data holds HTML-like strings everywhere."""
    (targets / "0003.png").rename(targets / QUOTED)
    settings = ExplainSettings(top_images=12, words_per_image=3, top_words=5, vocabulary_size=2000)
    explain(tiny_run, targets, settings=settings, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
    run = tiny_run.path
    explanations = json.loads((run / "explanations.json").read_text())
    explanations["model"] = MODEL
    filters = explanations["filters"]
    filters[1]["words"][0]["word"] = SCRIPT_WORD
    filters[4]["words"].insert(0, {"word": "lighthouse", "count": 12})
    filters[6]["words"].insert(1, {"word": "lighthouses", "count": 11})
    (run / "explanations.json").write_text(json.dumps(explanations))

    names = sorted(p.name for p in targets.iterdir())
    made_from = {"run_id": tiny_run.config["run_id"]}  # what lavise evaluate and compare-groups record
    (run / "evaluation.json").write_text(json.dumps({
        "model": "tiny", "layer": "features.3", "dataset": {}, "settings": {}, **made_from,
        "methods": {"attention": {"recall@5": 0.4, "recall@10": 0.5, "recall@20": 0.6, "precision@1": 0.2,
                                  "filters": 8, "seen": None, "unseen": None, "lenient": {"recall@5": 0.5}}},
        "filters": [
            {"filter": u,
             "ground_truth": [{"concept": SCRIPT_WORD if u == 2 else "circle", "iou": 0.31}],
             "netdissect": {"concept": NETDISSECT, "iou": 0.2} if u == 2 else None,
             "methods": {"attention": {"words": ["circle"], "recall@5": 0.9 if u == 6 else u / 10,
                                       "recall@10": None, "recall@20": None, "precision@1": None}}}
            for u in range(8)
        ],
    }))
    (run / "groups.json").write_text(json.dumps({
        "run": "run", "target": {}, "settings": {}, **made_from, "explanation_id": explanations["explanation_id"],
        "groups": [{"name": "indoor", "images": 6}, {"name": GROUP, "images": 6}],
        "filters": [
            {"filter": u, "words": ["circle"], "qualified": {"indoor": 3, GROUP: 1}, "share": {"indoor": 0.5, GROUP: 0.17},
             "difference": 0.33, "ci": [0.1, 0.5], "p_value": 0.04, "q_value": 0.08,
             "examples": {"indoor": [QUOTED, names[0]], GROUP: [names[1]]}}
            for u in (2, 0, 1, 3, 4, 5, 6, 7)
        ],
        "concepts": [{"word": "circle", "filters": [2, 0], "score": 1.2, "direction": GROUP}],
        "chart": "groups.png",
    }))
    return write_report(run, model=tiny_model, cache_dir=tmp_path / "cache", compute=compute).parent


def test_browse_search_open_a_filter_from_file_and_http(browser, report, tmp_path):
    watched = Watched(browser)
    page = watched.page
    page.goto((report / "index.html").as_uri())
    page.wait_for_selector("#grid .card")
    assert watched.cards() == list(range(8))
    assert page.title() == f"{MODEL} features.3 — lavise report"  # escaped in the HTML, shown as text

    # search: exactly the filters with a word containing the text stay
    page.fill("#search", "lighthouse")
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 2")
    assert sorted(watched.cards()) == [4, 6]
    assert page.inner_text("#count") == "2 of 8 filters have a word containing “lighthouse”"
    page.fill("#search", "<script>")
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 1")
    assert watched.cards() == [1]
    assert SCRIPT_WORD in page.inner_text("#grid")  # the word shows as text
    page.fill("#search", "no such word at all")
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 0")
    page.fill("#search", "")
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 8")

    # sorting by the evaluation's score, and jumping to a filter by number
    page.select_option("#sort", "score")
    assert watched.cards()[:2] == [6, 7]
    page.select_option("#sort", "filter")
    assert watched.cards() == list(range(8))
    page.fill("#jump-input", "99")
    page.click("#jump button")
    assert page.inner_text("#jump-note") == "no filter 99 (filters 0–7)"
    page.fill("#jump-input", "5")
    page.click("#jump button")
    page.wait_for_selector("#filter-title")
    assert page.inner_text("#filter-title") == "Filter 5 of features.3"
    page.go_back()
    page.wait_for_selector("#grid .card")
    watched.all_images_loaded("#grid .card img", 128)
    page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)

    # one filter: its images, in order, loaded, with their names; its words with counts
    data = json.loads((report.parent / "explanations.json").read_text())["filters"][2]
    page.click('#grid .card[data-filter="2"]')
    page.wait_for_selector("#images figure")
    assert page.url.endswith("#filter-2")
    captions = page.eval_on_selector_all("#images figcaption", "cs => cs.map(c => c.textContent)")
    assert captions == [f"{rank + 1}. {name}" for rank, name in enumerate(data["top_images"])]
    assert any(QUOTED in caption for caption in captions)  # the quoted file name, literally
    assert watched.all_images_loaded("#images img", 128)
    rows = page.eval_on_selector_all("#words tbody tr", "rs => rs.map(r => [0, 1, 2].map(i => r.cells[i].textContent))")
    assert rows == [[w["word"], str(w["first"]), str(w["count"])] for w in data["words"]]
    evaluation = page.inner_text("#filter-evaluation")
    assert SCRIPT_WORD in evaluation and NETDISSECT in evaluation
    groups = page.inner_text("#filter-groups")
    assert "Ranked 1 of 8" in groups and GROUP in groups
    watched.all_images_loaded("#filter-groups img", 128)
    page.screenshot(path=str(tmp_path / "filter.png"), full_page=True)

    # the analysis views
    page.click('#nav a[href="#evaluation"]')
    page.wait_for_selector("#evaluation-methods")
    assert "attention" in page.inner_text("#evaluation-methods")
    page.click('#nav a[href="#groups"]')
    page.wait_for_selector("#groups-table")
    assert GROUP in page.inner_text("#groups-table")

    # nothing from the data ran or became markup
    assert watched.dialogs == []
    assert page.evaluate("document.querySelectorAll('script').length") == 2
    assert page.evaluate("document.querySelectorAll('img[src=x], b[onmouseover]').length") == 0
    assert watched.problems == []
    for shot in ("overview.png", "filter.png"):
        assert (tmp_path / shot).stat().st_size > 10_000
    page.close()

    _served_over_http(browser, report)


def _served_over_http(browser, report: Path) -> None:
    """The same report from a local static web server: a filter's link, its images, the overview."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(report))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        watched = Watched(browser)
        page = watched.page
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/index.html#filter-3")
        page.wait_for_selector("#images figure")
        assert page.inner_text("#filter-title") == "Filter 3 of features.3"
        assert watched.all_images_loaded("#images img", 128)
        page.click('#nav a[href="#overview"]')
        page.wait_for_selector("#grid .card")
        assert watched.cards() == list(range(8))
        assert watched.problems == [] and watched.dialogs == []
        page.close()
    finally:
        server.shutdown()
        server.server_close()
