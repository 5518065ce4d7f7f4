"""Open a rendered report in headless Chromium with the network cut off.

Proves: the page renders, logs no console error (a CSP violation would be one), requests nothing
but the file itself, and every <img> decodes. Saves screenshots to test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
import unicodedata
from pathlib import Path

import pytest
from report_fixtures import build_run_dir

from audit.report import render_report, render_side_by_side
from tests.external import missing

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-sync",
    "--no-first-run",
    "--no-pings",
    "--metrics-recording-only",
    "--disable-features=Translate,OptimizationHints,MediaRouter,InterestFeedContentSuggestions",
]


def _sync_playwright():
    _require_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("chromium", "the playwright package is not installed (pip install playwright)")
    return sync_playwright


def _require_chromium() -> None:
    if not CHROMIUM.exists():
        missing("chromium", f"{CHROMIUM} is absent: install Debian's chromium "
                            "(apt-get install chromium)")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def open_offline(browser, html: Path):
    """A page on ``html`` with every other request aborted and recorded."""
    url = html.resolve().as_uri()
    context = browser.new_context(viewport={"width": 1280, "height": 1400},
                                  java_script_enabled=True, service_workers="block")
    page = context.new_page()
    record = {"console": [], "page_errors": [], "requests": [], "blocked": [], "failed": []}
    page.on("console", lambda m: record["console"].append((m.type, m.text)))
    page.on("pageerror", lambda e: record["page_errors"].append(str(e)))
    page.on("request", lambda r: record["requests"].append(r.url))
    page.on("requestfailed", lambda r: record["failed"].append(r.url))

    def route(r):
        if r.request.url == url:
            r.continue_()
        else:
            record["blocked"].append(r.request.url)
            r.abort()

    context.route("**/*", route)
    page.goto(url, wait_until="load")
    page.wait_for_load_state("networkidle")
    return context, page, url, record


def images_state(page) -> list[dict]:
    return page.evaluate(
        "() => Array.from(document.images).map(i => ({src: i.src.slice(0, 30),"
        " complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}))")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    run = build_run_dir(root / "run", n_boxes=40, published=True, seed=7)
    return render_report(run, root / "out" / "report.html")


def test_report_renders_offline_without_errors_or_requests(rendered):
    sync_playwright = _sync_playwright()
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS,
                                    headless=True)
        try:
            context, page, url, rec = open_offline(browser, rendered)
            assert page.title().startswith("Saliency audit")
            assert page.locator("#headline-table tr[data-kind='method']").count() == 8 * 3
            assert page.locator("section.pathology").count() == 8
            errors = [t for kind, t in rec["console"] if kind in ("error", "warning")]
            assert errors == [], errors
            assert rec["page_errors"] == []
            others = [u for u in rec["requests"] if u != url and not u.startswith("data:")]
            assert others == [], others
            assert rec["blocked"] == [] and rec["failed"] == []
            imgs = images_state(page)
            assert len(imgs) >= 8 * (7 + 3 * 3) + 2  # avg maps + galleries + curves
            bad = [i for i in imgs if not (i["complete"] and i["w"] > 0 and i["h"] > 0)]
            assert bad == [], bad[:5]
            assert page.evaluate("() => document.querySelectorAll('svg.chart').length") >= 16
            # a print stylesheet exists and applies
            has_print = page.evaluate(
                "() => Array.from(document.styleSheets).some(s => Array.from(s.cssRules)"
                ".some(r => r.media && r.media.mediaText === 'print'))")
            assert has_print
            page.screenshot(path=str(ARTIFACTS / "report.png"))
            page.locator("#pathology-effusion").screenshot(
                path=str(ARTIFACTS / "report-pathology.png"))
            page.emulate_media(media="print")
            assert page.evaluate(
                "() => getComputedStyle(document.querySelector('nav.toc')).display") == "none"
            context.close()
        finally:
            browser.close()
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


#: Pixels of one overlay, read back in the page: [[r, g, b], ...] at the given points.
READ_PIXELS = """([id, points]) => {
  const img = document.getElementById(id).querySelector('img');
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext('2d');
  ctx.drawImage(img, 0, 0);
  return points.map(([x, y]) => Array.from(ctx.getImageData(x, y, 1, 1).data.slice(0, 3)));
}"""


def _near(rgb, want, tol=70) -> bool:
    return max(abs(int(a) - int(b)) for a, b in zip(rgb, want, strict=True)) <= tol


def test_gallery_overlays_load_with_colour_bar_maximum_and_both_boxes(rendered, tmp_path):
    """Every gallery image decodes; on each overlay the expert box (magenta), the predicted box
    (black and white dashes) and the colour bar (viridis, yellow at the top) are drawn where the
    run's boxes say; the page carries the colour-bar legend; a click opens the larger view."""
    import pandas as pd

    from audit.report.overlay import BAR_MARGIN, BAR_WIDTH, EXPERT_COLOUR, GALLERY_SIZE, colour_lut

    sync_playwright = _sync_playwright()
    boxes = pd.read_parquet(rendered.parent.parent / "run" / "boxes.parquet")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            context, page, url, rec = open_offline(browser, rendered)
            figures = page.evaluate(
                "() => Array.from(document.querySelectorAll('.gallery figure')).map(f => ({"
                "id: f.id, image: f.dataset.image, method: f.dataset.method, box: f.dataset.box,"
                "finding: f.dataset.finding,"
                "map: f.dataset.hasMap, w: f.querySelector('img').naturalWidth,"
                "h: f.querySelector('img').naturalHeight,"
                "complete: f.querySelector('img').complete}))")
            assert len(figures) >= 8 * 3 * 3
            assert all(f["complete"] and f["w"] > 0 for f in figures)
            assert {f["map"] for f in figures} == {"yes"}
            assert page.locator("section.pathology .colour-bar").count() >= 8 * 2
            gradient = page.evaluate("() => getComputedStyle(document.querySelector("
                                     "'.colour-bar')).backgroundImage")
            assert gradient.startswith("linear-gradient")
            yellow, dark = colour_lut()[255], colour_lut()[0]
            s = GALLERY_SIZE / 1024.0
            for f in figures:
                row = boxes[(boxes["image_key"] == f["image"]) & (boxes["method"] == f["method"])
                            & (boxes["finding"] == f["finding"])
                            & (boxes["box_index"] == int(f["box"]))].iloc[0]
                x, y, w, h = (float(row[c]) * s for c in ("box_x", "box_y", "box_w", "box_h"))
                px, py, pw, ph = (float(row[c]) * s for c in ("pred_x", "pred_y", "pred_w",
                                                              "pred_h"))
                bar_x = f["w"] - 64 + BAR_MARGIN + BAR_WIDTH // 2
                expert = [[round(x), round(y + h * t / 10)] for t in range(2, 9)]
                expert += [[round(x + w * t / 10), round(y)] for t in range(2, 9)]
                points = [[bar_x, BAR_MARGIN + 2], [bar_x, f["h"] - BAR_MARGIN - 3], *expert]
                if math.isfinite(pw) and pw > 30 and ph > 30:  # the predicted box's four edges
                    edge = [(px + pw * t / 40, yy) for t in range(4, 37) for yy in (py, py + ph)]
                    edge += [(xx, py + ph * t / 40) for t in range(4, 37) for xx in (px, px + pw)]
                    points += [[min(f["w"] - 65, round(a)), min(f["h"] - 1, round(b))]
                               for a, b in edge]
                got = page.evaluate(READ_PIXELS, [f["id"], points])
                assert _near(got[0], yellow, 40) and _near(got[1], dark, 40), (f, got[:2])
                on_edge = [_near(c, EXPERT_COLOUR) for c in got[2:2 + len(expert)]]
                assert sum(on_edge) >= len(on_edge) // 2, (f, got[2:2 + len(expert)])
                dashes = got[2 + len(expert):]
                if dashes:
                    assert any(min(c) > 200 for c in dashes), (f, "no white dash")
                    assert any(max(c) < 60 for c in dashes), (f, "no black dash")
            # a click opens the larger view: the figure becomes the :target, fixed and wide
            first = page.locator(".gallery figure a.enlarge").first
            first.click()
            assert page.evaluate("() => location.hash") == "#" + figures[0]["id"]
            shown = page.evaluate("(id) => { const f = document.getElementById(id);"
                                  "return [getComputedStyle(f).position,"
                                  " f.querySelector('img').getBoundingClientRect().width]; }",
                                  figures[0]["id"])
            assert shown[0] == "fixed" and shown[1] > 400
            page.screenshot(path=str(tmp_path / "enlarged.png"))
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report-enlarged.png"))
            context.close()
        finally:
            browser.close()


def test_side_by_side_renders_offline(tmp_path):
    sync_playwright = _sync_playwright()
    runs = [build_run_dir(tmp_path / n, n_boxes=18, findings=["Mass", "Effusion"], seed=s,
                          with_thumbs=False, with_maps=False, with_curves=False)
            for n, s in (("a", 1), ("b", 2))]
    out = render_side_by_side(runs, tmp_path / "side.html", labels=["honest", "shortcut"])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            context, page, url, rec = open_offline(browser, out)
            assert [t for k, t in rec["console"] if k in ("error", "warning")] == []
            assert [u for u in rec["requests"] if u != url and not u.startswith("data:")] == []
            imgs = images_state(page)
            assert len(imgs) == 2 * 2 * 7
            assert all(i["complete"] and i["w"] > 0 for i in imgs)
            context.close()
        finally:
            browser.close()



@pytest.mark.slow  # prints a PDF with Chromium (~10 s): CI runs it
def test_print_pdf_uses_the_print_stylesheet(tmp_path):
    _require_chromium()
    from audit.report import ReportExistsError, print_pdf

    run = build_run_dir(tmp_path / "run", n_boxes=12, findings=["Mass", "Effusion"],
                        with_curves=False)
    html = render_report(run, tmp_path / "out" / "report.html")
    pdf = print_pdf(html)
    data = pdf.read_bytes()
    assert pdf == html.with_suffix(".pdf") and data.startswith(b"%PDF")
    n_pages = len(re.findall(rb"/Type\s*/Page(?!s)", data))
    assert n_pages >= 3  # summary, sections, methods...
    try:
        from pypdf import PdfReader
    except ImportError:
        missing("chromium", "pypdf is not installed (pip install pypdf)")
    # NFKC: the PDF's ligatures ("fi", "ff", also inside hex digests) read as their letters
    pages = [unicodedata.normalize("NFKC", page.extract_text()) for page in PdfReader(pdf).pages]
    assert len(pages) == n_pages
    digest = hashlib.sha256(html.read_bytes()).hexdigest()
    for i, text in enumerate(pages, start=1):  # the footer: run id, report sha256, page x of y
        assert f"page {i} of {n_pages}" in text and "run run-0000-synthetic" in text, i
        assert f"report.html sha256 {digest}" in text.replace("\n", " "), i
    first = pages[0]  # the audit certificate, alone on the first page
    for words in ("Audit certificate", "What was audited, and how", "b" * 64,
                  "Known limitations", "7 × 7 grid", "Reviewed by", "Mass", "Effusion"):
        assert words in first, words
    assert "Verdicts: legend" not in first and "Verdicts: legend" in pages[1]
    assert "Not computed in this run" in "".join(pages)
    assert stat.S_IMODE(pdf.stat().st_mode) == 0o666 & ~_umask()
    in_run = render_report(run)  # RUN_DIR/report.html
    print_pdf(in_run)
    with pytest.raises(ReportExistsError):
        print_pdf(in_run)  # never overwrite a file in a run directory
