"""The HTML audit report: structure, exact numbers, escaping, no PHI, no network, immutable runs."""

from __future__ import annotations

import hashlib
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from report_fixtures import (
    NIH_BOX_COUNTS,
    add_maps,
    add_thumbnails,
    build_run_dir,
    model_finding,
)

from audit.report import (
    ReportExistsError,
    render_markdown_summary,
    render_report,
    render_side_by_side,
)
from audit.report.cases import select_cases

INJECTION = "<script>alert(1)</script>"
REFERENCE_JSON = Path(__file__).resolve().parents[1] / "audit/report/reference_figures.json"


# ---- a small HTML model ---------------------------------------------------------------------


class Node:
    def __init__(self, tag: str, attrs: dict, parent: Node | None):
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node] = []
        self.text: list[str] = []

    def all_text(self) -> str:
        return "".join(self.text) + "".join(c.all_text() for c in self.children)

    def iter(self):
        yield self
        for c in self.children:
            yield from c.iter()

    def find_all(self, tag: str | None = None, **attrs) -> list[Node]:
        out = []
        for n in self.iter():
            if tag is not None and n.tag != tag:
                continue
            if all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items()):
                out.append(n)
        return out


VOID = {"meta", "img", "br", "link", "input", "hr", "col", "area", "base", "source", "wbr"}
SVG_SELF_CLOSING = {"line", "rect", "circle", "path"}


class TreeBuilder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {}, None)
        self.cur = self.root
        self.start_tags: list[tuple[str, dict]] = []
        self.style_text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = {k: (v or "") for k, v in attrs}
        self.start_tags.append((tag, a))
        node = Node(tag, a, self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        a = {k: (v or "") for k, v in attrs}
        self.start_tags.append((tag, a))
        self.cur.children.append(Node(tag, a, self.cur))

    def handle_endtag(self, tag):
        n = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.text.append(data)
        if self.cur.tag == "style":
            self.style_text.append(data)


def parse(html: str) -> TreeBuilder:
    tb = TreeBuilder()
    tb.feed(html)
    tb.close()
    return tb


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "x"


def assert_no_remote_references(html: str) -> None:
    tb = parse(html)
    for tag, attrs in tb.start_tags:
        for k, v in attrs.items():
            if k in ("src", "href", "srcset", "action", "poster", "data", "xlink:href"):
                low = v.strip().lower()
                assert "http://" not in low and "https://" not in low, (tag, k, v[:80])
                assert not low.startswith("//"), (tag, k, v[:80])
                if k == "src":
                    assert low.startswith("data:image/"), (tag, v[:60])
                if k == "href":
                    assert low.startswith("#"), (tag, v)
            assert not k.startswith("on"), f"event handler attribute {k} on <{tag}>"
            if k == "style":
                assert "url(" not in v.lower()
        assert tag not in ("script", "iframe", "object", "embed", "link", "base", "form"), tag
    css = "".join(tb.style_text) + " ".join(
        a.get("style", "") for _, a in tb.start_tags)
    for url in re.findall(r"url\(([^)]*)\)", css, flags=re.I):
        assert "http" not in url.lower() and not url.strip("'\" ").startswith("//"), url
    assert "@import" not in css


def run_files_snapshot(run_dir: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for p in sorted(run_dir.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(run_dir))] = (hashlib.sha256(p.read_bytes()).hexdigest(),
                                                p.stat().st_mtime_ns)
    return out


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def published_run(tmp_path_factory) -> Path:
    return build_run_dir(tmp_path_factory.mktemp("pub") / "run", n_boxes=40, published=True,
                         seed=3)


@pytest.fixture(scope="module")
def published_report(published_run, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("pub_out") / "report.html"
    path = render_report(published_run, out)
    return path, path.read_text(encoding="utf-8")


# ---- structure and exact numbers -----------------------------------------------------------


def test_every_pathology_has_its_section(published_run, published_report):
    _, html = published_report
    tb = parse(html)
    ids = {n.attrs.get("id") for n in tb.root.iter() if n.attrs.get("id")}
    pp = pd.read_csv(published_run / "per_pathology.csv")
    boxes = pd.read_parquet(published_run / "boxes.parquet")
    names = set(pp["pathology"])
    assert names == {model_finding(f) for f in NIH_BOX_COUNTS} == set(boxes["pathology"])
    assert "Infiltrate" in set(boxes["finding"])  # NIH name in boxes, model name in aggregates
    for name in names:
        assert f"pathology-{slug(name)}" in ids, name
    sections = tb.root.find_all("section")
    assert sum(1 for s in sections if s.attrs.get("id", "").startswith("pathology-")) == len(names)
    for sid in ("summary", "repeatability", "randomization", "fidelity", "provenance", "rejects",
                "not-computed", "methods"):
        assert sid in ids
    assert "change" not in ids  # no previous run: listed as not computed, no empty section


def test_headline_numbers_equal_per_pathology_csv(published_run, published_report):
    _, html = published_report
    tb = parse(html)
    (table,) = tb.root.find_all("table", id="headline-table")
    decimals = int(table.attrs["data-decimals"])
    pp = pd.read_csv(published_run / "per_pathology.csv")
    expected = {(str(r["pathology"]), str(r["method"])): r for r in pp.to_dict("records")}
    seen = set()
    n_checked = 0
    for tr in table.find_all("tr"):
        kind = tr.attrs.get("data-kind")
        if kind not in ("method", "baseline"):
            continue
        key = (tr.attrs["data-pathology"], tr.attrs["data-method"])
        assert key not in seen
        seen.add(key)
        row = expected[key]
        assert kind == row["kind"]
        spans = [n for n in tr.iter() if "data-col" in n.attrs]
        cols = {s.attrs["data-col"] for s in spans}
        assert {"n", "iou_mean", "iou_mean_lo", "iou_mean_hi", "iou_median", "pointing_rate",
                "pointing_lo", "pointing_hi", "iobb_hit_0.1_rate", "iobb_hit_0.25_rate",
                "iobb_hit_0.5_rate"} <= cols
        for span in spans:
            col = span.attrs["data-col"]
            want = row[col]
            text = span.all_text().strip()
            if col == "n":
                assert text == str(int(want)) == span.attrs["data-value"]
            elif isinstance(want, float) and math.isnan(want):
                assert span.attrs["data-value"] == "nan" and text == "–"
            else:
                assert float(span.attrs["data-value"]) == float(want), (key, col)
                assert text == f"{float(want):.{decimals}f}", (key, col)
            n_checked += 1
        verdict = row["verdict"] if isinstance(row["verdict"], str) else ""
        assert verdict in tr.all_text()
    assert seen == set(expected)
    assert n_checked >= 11 * len(expected)


def test_verdicts_are_three_valued_with_n_n_needed_and_a_legend(published_run,
                                                               published_report):
    from audit.metrics.criteria import format_n_needed
    from audit.protocol import VERDICT_LEGEND

    _, html = published_report
    tb = parse(html)
    (legend,) = tb.root.find_all("dl", id="verdict-legend")
    sentences = {dd.attrs["data-verdict"]: dd.all_text() for dd in legend.find_all("dd")}
    assert sentences == VERDICT_LEGEND  # one sentence each: PASS, FAIL, INCONCLUSIVE
    pp = pd.read_csv(published_run / "per_pathology.csv")
    assert {"FAIL", "INCONCLUSIVE"} <= set(pp["verdict"].dropna())  # 3-7 boxes a pathology
    (table,) = tb.root.find_all("table", id="headline-table")
    rows = {(tr.attrs["data-pathology"], tr.attrs["data-method"]): tr
            for tr in table.find_all("tr") if tr.attrs.get("data-kind") == "method"}
    for r in pp[pp["kind"] == "method"].to_dict("records"):
        tr = rows[(r["pathology"], r["method"])]
        (badge,) = [n for n in tr.iter() if "badge" in n.attrs.get("class", "")]
        assert badge.attrs["class"] == f"badge {r['verdict'].lower()}"
        (n_span,) = [n for n in tr.iter() if n.attrs.get("class") == "verdict-n"]
        assert n_span.attrs["data-n"] == str(int(r["n"]))
        want = format_n_needed(r["n_needed"], bool(r["n_needed_approx"])) \
            if r["verdict"] == "INCONCLUSIVE" else ""
        assert n_span.attrs["data-n-needed"] == want
        assert (f"n needed {want}" in n_span.all_text()) == bool(want)
    # INCONCLUSIVE is neutral, not green
    css = re.search(r"\.badge\.inconclusive \{([^}]*)\}", html).group(1)
    assert "var(--pass)" not in css and "#e3f4e8" not in css
    (header,) = tb.root.find_all("p", **{"class": "overall"})
    assert "inconclusive of" in header.all_text()


def test_published_reference_figures_shown_with_source(published_report):
    _, html = published_report
    ref = json.loads(REFERENCE_JSON.read_text())["chestxray8_localization_iobb"]
    tb = parse(html)
    (table,) = tb.root.find_all("table", id="headline-table")
    ref_rows = [tr for tr in table.find_all("tr") if tr.attrs.get("data-kind") == "reference"]
    assert len(ref_rows) == 8
    by_path = {tr.attrs["data-pathology"]: tr for tr in ref_rows}
    values = by_path["Infiltration"].find_all("span", **{"class": "ref"})
    assert [float(v.attrs["data-value"]) for v in values] == ref["values"]["Infiltration"]
    assert [v.all_text() for v in by_path["Nodule"].find_all("span", **{"class": "ref"})] == [
        "0.1645", "0.0506", "0.0126"]
    assert ref["short_label"] in by_path["Mass"].all_text()
    assert "Wang X, Peng Y, Lu L, Lu Z, Bagheri M, Summers RM" in html
    assert "not like-for-like" in html
    # the paper's IoBB and the run's are the same quantity (over the detected box)
    assert "The quantity is the same as this run&#39;s IoBB hit rates" in html
    assert "divides by the expert box" not in html
    assert "intersection over the area of the detected (predicted) box" in html


def test_reference_figures_absent_for_unpublished_model(tmp_path):
    run = build_run_dir(tmp_path / "run", n_boxes=16, published=False, with_curves=False)
    html = render_report(run, tmp_path / "out" / "r.html").read_text()
    assert 'data-kind="reference"' not in html
    assert "Wang X, Peng Y" in html  # still cited among the method references
    assert "not like-for-like" not in html


def test_target_layer_and_references_are_stated(published_report):
    _, html = published_report
    assert "features.norm5 (rectified: ReLU(norm5) as pooled)" in html
    for ref in ("Selvaraju", "Chattopadhay", "Sundararajan", "Excitation Backprop", "Adebayo",
                "Petsiuk", "ChestX-ray8", "Arun N"):
        assert ref in html, ref


def test_gallery_shows_hits_misses_and_median_per_method(published_run, published_report):
    _, html = published_report
    tb = parse(html)
    (sec,) = tb.root.find_all("section", id="pathology-atelectasis")
    figures = [f for f in sec.find_all("figure") if "data-case" in f.attrs]
    methods = {f.attrs["data-method"] for f in figures}
    assert methods == {"gradcam", "gradcampp", "integrated_gradients"}  # baselines: no gallery
    boxes = pd.read_parquet(published_run / "boxes.parquet")
    atel = boxes[boxes["pathology"] == "Atelectasis"]
    for m in methods:
        cases = [f.attrs["data-case"] for f in figures if f.attrs["data-method"] == m]
        hits = [f.attrs["data-hit"] for f in figures if f.attrs["data-method"] == m]
        assert "median" in cases and cases[0] == "best hit" and cases[-1].endswith("miss")
        assert hits[0] == "yes" and hits[-1] == "no"
        units = atel[atel["method"] == m].groupby("image_key")["pointing_hit"].any()
        (h4,) = [g.find_all("h4")[0] for g in sec.find_all("div")
                 if g.attrs.get("data-method") == m and "method-gallery" in g.attrs["class"]]
        assert f"{int(units.sum())}/{len(units)} hits" in h4.all_text()
    assert {f.attrs["data-has-map"] for f in figures} == {"yes"}  # maps/ of an older run
    captions = " ".join(f.all_text() for f in figures)
    assert "p(Atelectasis) = " in captions and "IoU " in captions and "pointing " in captions
    for f in figures:  # a larger view without script: the image links to its own figure
        (a,) = [n for n in f.iter() if n.tag == "a" and "enlarge" in n.attrs.get("class", "")]
        assert a.attrs["href"] == "#" + f.attrs["id"]


def _units(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame([{"image_key": k, "pathology": "X", "finding": "X", "model_finding": "X",
                          "method": "m", "box_index": b, "best_match": best, "iou": iou,
                          "iobb": iou, "pointing_hit": hit, "pointing_distance": dist}
                         for k, b, best, iou, hit, dist in rows])


def test_select_cases_ranks_by_the_pointing_game_the_verdict_reads():
    # a: hit, IoU 0.1; b: miss 5 px off, IoU 0.9; c: miss 40 px off; d: hit on its second box
    # (the best-matching box by IoU is a miss), IoU 0.3; e: miss 10 px off
    boxes = _units([("a", 0, True, 0.1, True, 0.0), ("b", 0, True, 0.9, False, 5.0),
                    ("c", 0, True, 0.2, False, 40.0), ("d", 0, True, 0.3, False, 12.0),
                    ("d", 1, False, 0.05, True, 0.0), ("e", 0, True, 0.4, False, 10.0)])
    got = select_cases(boxes, "pointing", 1.0)
    # ranking: d (hit, IoU 0.3), a (hit, 0.1), b (5 px), e (10 px), c (40 px)
    # hits d, a: the typical hit (lower median) is d, the best hit, shown once
    assert list(got["case"]) == ["best hit", "median", "typical miss", "worst miss"]
    assert list(got["image_key"]) == ["d", "b", "e", "c"]
    assert list(got["is_hit"]) == [True, False, False, False]
    assert set(got["n_hits"]) == {2} and set(got["n_units"]) == {5}
    assert got.iloc[0]["box_index"] == 0  # the best-matching box is the one drawn
    # ranked by IoU (an IoU criterion) the order is b, e, d, c, a: hits at IoU >= 0.25
    by_iou = select_cases(boxes, "iou", 0.25)
    assert list(by_iou["image_key"]) == ["b", "e", "d", "c", "a"]
    assert list(by_iou["case"]) == ["best hit", "typical hit", "median", "typical miss",
                                    "worst miss"]
    # a median that is also the best hit keeps the name "median"
    two = select_cases(boxes[boxes["image_key"].isin(["a", "b"])], "pointing", 1.0)
    assert list(two["case"]) == ["median", "worst miss"] and list(two["image_key"]) == ["a", "b"]
    assert list(select_cases(boxes.iloc[:1], "pointing", 1.0)["case"]) == ["median"]


# ---- safety: escaping, network, PHI --------------------------------------------------------


def test_injected_file_name_and_finding_are_escaped(tmp_path):
    run = build_run_dir(tmp_path / "run", n_boxes=24, findings=["Mass", "Nodule", "Effusion"],
                        special_image_key=INJECTION, special_finding=INJECTION, seed=5)
    boxes = pd.read_parquet(run / "boxes.parquet")
    assert INJECTION in set(boxes["image_key"]) and INJECTION in set(boxes["finding"])
    path = render_report(run, tmp_path / "out" / "report.html")
    html = path.read_text()
    assert INJECTION not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    tb = parse(html)
    assert not [t for t, _ in tb.start_tags if t == "script"]
    ids = {n.attrs.get("id") for n in tb.root.iter()}
    assert f"pathology-{slug(INJECTION)}" in ids
    # the escaped strings come back verbatim as text and attribute values
    assert any(n.attrs.get("data-pathology") == INJECTION for n in tb.root.iter())
    assert INJECTION in tb.root.all_text()
    assert_no_remote_references(html)
    summary = (path.parent / "summary.md").read_text()
    assert INJECTION not in summary and "&lt;script&gt;" in summary


def test_report_makes_no_remote_reference_and_forbids_requests(published_report):
    _, html = published_report
    assert_no_remote_references(html)
    tb = parse(html)
    metas = [a for t, a in tb.start_tags if t == "meta"
             and a.get("http-equiv", "").lower() == "content-security-policy"]
    assert metas and metas[0]["content"] == (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'")
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html
    assert "@media print" in html


def test_phi_in_unknown_run_json_fields_is_never_rendered(tmp_path):
    sentinel = "SENTINEL^PHI"
    run = build_run_dir(
        tmp_path / "run", n_boxes=16, findings=["Mass", "Nodule"],
        dataset_extra={"patient_name": sentinel, "PatientID": "SENTINEL-ID-7"},
        run_json_extra={"dicom_header": {"PatientName": sentinel, "PatientBirthDate": "19700101"},
                        "operator": sentinel},
    )
    meta = json.loads((run / "run.json").read_text())
    meta["model"]["patient_name"] = sentinel
    (run / "run.json").write_text(json.dumps(meta))
    path = render_report(run, tmp_path / "out" / "report.html")
    for text in (path.read_text(), (path.parent / "summary.md").read_text(),
                 render_markdown_summary(run)):
        assert "SENTINEL" not in text
        assert "19700101" not in text
        assert "patient_name" not in text and "PatientName" not in text


def test_report_of_phi_free_run_shows_only_file_names_as_image_identifiers(published_run,
                                                                            published_report):
    _, html = published_report
    text = parse(html).root.all_text()
    for tag in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                "InstitutionName", "ReferringPhysicianName", "StudyDate"):
        assert tag not in html, tag
    keys_in_report = set(re.findall(r"\b\d{8}_\d{3}\.png\b", text))
    boxes = pd.read_parquet(published_run / "boxes.parquet")
    rejects = pd.read_csv(published_run / "rejects.csv")
    assert keys_in_report <= set(boxes["image_key"]) | set(rejects["image_key"])


# ---- a finished run directory is never modified -----------------------------------------------


def test_rendering_never_modifies_a_finished_run_directory(tmp_path):
    run = build_run_dir(tmp_path / "run", n_boxes=16, findings=["Mass", "Effusion"])
    before = run_files_snapshot(run)
    assert "report.html" not in before
    first = render_report(run)  # default: RUN_DIR/report.html, only while absent
    assert first == run / "report.html"
    after_first = run_files_snapshot(run)
    assert {k: v for k, v in after_first.items() if k in before} == before
    assert set(after_first) - set(before) == {"report.html", "summary.md"}
    with pytest.raises(ReportExistsError, match="never modified"):
        render_report(run)
    with pytest.raises(ReportExistsError):
        render_report(run, out_html=run / "report.html")
    with pytest.raises(ReportExistsError):
        render_report(run, out_html=run / "summary.md")
    elsewhere = render_report(run, out_html=tmp_path / "rerender" / "report.html")
    assert elsewhere.is_file()
    new_in_run = render_report(run, out_html=run / "report-v2.html")  # a new file is allowed
    after = run_files_snapshot(run)
    assert {k: v for k, v in after.items() if k in after_first} == after_first
    assert set(after) - set(after_first) == {new_in_run.name}
    assert (tmp_path / "rerender" / "summary.md").is_file()
    copy = pd.read_csv(tmp_path / "rerender" / "report_table.csv")
    pd.testing.assert_frame_equal(copy, pd.read_csv(run / "per_pathology.csv"))
    assert json.loads((tmp_path / "rerender" / "report_table.json").read_text()) == json.loads(
        (run / "per_pathology.json").read_text())


# ---- absent parts ---------------------------------------------------------------------------


def test_absent_files_are_reported_as_not_computed(tmp_path):
    run = build_run_dir(tmp_path / "run", n_boxes=12, findings=["Mass", "Nodule"],
                        with_images=False, with_curves=False, with_maps=False,
                        with_average_maps=False, with_thumbs=False, with_rejects=False,
                        with_paired=False)
    html = render_report(run, tmp_path / "out" / "report.html").read_text()
    tb = parse(html)
    (listing,) = tb.root.find_all("section", id="not-computed")
    items = [li.all_text() for li in listing.find_all("li")]
    assert items == ["Repeatability", "Randomization sensitivity",
                     "Fidelity: deletion and insertion", "Integrated Gradients completeness",
                     "Rejected inputs (no rejects table recorded)",
                     "Change since the previous run (no previous run was given)",
                     "Mass: average maps", "Nodule: average maps"]
    ids = {n.attrs.get("id") for n in tb.root.iter()}
    assert not ids & {"repeatability", "randomization", "fidelity", "rejects", "change"}
    assert "not computed in this run." not in html  # no section of one sentence
    for text in ("This run kept no map of these cases", "Some thumbnails are not stored"):
        assert text in html, text
    assert_no_remote_references(html)


def test_run_with_only_run_json_and_per_pathology_renders(tmp_path):
    run = build_run_dir(tmp_path / "run", n_boxes=12, findings=["Mass", "Nodule"])
    for name in ("boxes.parquet", "boxes.csv", "images.parquet", "curves.parquet",
                 "average_maps.npz", "paired.csv", "rejects.csv"):
        (run / name).unlink()
    html = render_report(run, tmp_path / "out" / "report.html").read_text()
    assert 'id="pathology-mass"' in html and 'id="pathology-nodule"' in html
    assert "<li>Mass: per-box scores, average maps, gallery</li>" in html


def test_hit_rate_cis_and_paired_differences_are_read_as_written(tmp_path):
    run = build_run_dir(tmp_path / "run", n_boxes=20, findings=["Mass", "Effusion"])
    pp = pd.read_csv(run / "per_pathology.csv")
    paired = pd.read_csv(run / "paired.csv")
    html = render_report(run, tmp_path / "out" / "r.html").read_text()
    tb = parse(html)
    (sec,) = tb.root.find_all("section", id="pathology-mass")
    (hits,) = sec.find_all("table", **{"class": "hits-table"})
    (tr,) = [t for t in hits.find_all("tr") if t.attrs.get("data-method") == "gradcam"]
    (span,) = [n for n in tr.iter() if n.attrs.get("data-col") == "iobb_hit_0.5_lo"]
    row = pp[(pp.pathology == "Mass") & (pp.method == "gradcam")].iloc[0]
    assert float(span.attrs["data-value"]) == row["iobb_hit_0.5_lo"]
    text = sec.all_text()
    assert "Paired differences" in text and "n pairs" in text
    first = paired[paired.pathology == "Mass"].iloc[0]
    for col in ("mean_diff", "diff_lo", "diff_hi"):
        assert f"{first[col]:.3f}" in text, col


def test_report_names_the_run_not_its_staging_folder(tmp_path):
    run = build_run_dir(tmp_path / ".run-x.partial", n_boxes=12, findings=["Mass", "Nodule"],
                        run_id="run-x", with_curves=False)
    html = render_report(run).read_text()  # rendered inside the staging folder, as the flow does
    assert "run-x" in html
    for text in (html, (run / "summary.md").read_text(), render_markdown_summary(run)):
        assert ".partial" not in text


# ---- change since the previous run, Markdown, side by side -----------------------------------


def test_change_since_previous_run_shows_arrows_and_cis(tmp_path):
    prev = build_run_dir(tmp_path / "prev", n_boxes=30, findings=["Mass", "Effusion"], seed=11,
                         quality_shift=0.25, run_id="run-prev")
    cur = build_run_dir(tmp_path / "cur", n_boxes=30, findings=["Mass", "Effusion"], seed=12,
                        run_id="run-cur")
    comparison = pd.DataFrame({"pathology": ["Mass"], "method": ["gradcam"],
                               "metric": ["pointing_rate"], "diff": [-0.2], "lo": [-0.35],
                               "hi": [-0.05], "regression": [True]})
    html = render_report(cur, tmp_path / "out" / "r.html", previous_run_dir=prev,
                         comparison=comparison).read_text()
    tb = parse(html)
    (table,) = tb.root.find_all("table", id="change-table")
    rows = [tr for tr in table.find_all("tr") if "data-method" in tr.attrs]
    assert len(rows) == 2 * 2 * 6  # 2 pathologies x 6 methods x 2 metrics
    assert "▼" in table.all_text()
    a = pd.read_csv(prev / "per_pathology.csv").set_index(["pathology", "method"])
    b = pd.read_csv(cur / "per_pathology.csv").set_index(["pathology", "method"])
    for tr in rows:
        if "pointing" not in tr.all_text():
            continue
        key = (tr.attrs["data-pathology"], tr.attrs["data-method"])
        delta = next(n for n in tr.iter() if n.attrs.get("data-col") == "delta")
        assert float(delta.attrs["data-value"]) == pytest.approx(
            b.loc[key, "pointing_rate"] - a.loc[key, "pointing_rate"])
    assert "run-prev" in html
    assert "Regression check" in html and "regression" in html


def test_markdown_summary_is_short_and_exact(published_run):
    md = render_markdown_summary(published_run)
    pp = pd.read_csv(published_run / "per_pathology.csv")
    assert md.startswith("# Saliency audit: densenet121-res224-all on nih\\_bbox\\_synthetic")
    verdicts = pp["verdict"].fillna("")
    overall = "FAIL" if (verdicts == "FAIL").any() else (
        "INCONCLUSIVE" if (verdicts == "INCONCLUSIVE").any() else "PASS")
    assert f"**{overall}**" in md
    n_inconclusive = int((verdicts == "INCONCLUSIVE").sum())
    assert n_inconclusive and f"{n_inconclusive} inconclusive of" in md
    for verdict in ("PASS", "FAIL", "INCONCLUSIVE"):
        assert f"**{verdict}**: " in md  # the legend, one sentence each
    table_rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "Pathology" not in ln]
    assert len(table_rows) == len(pp)
    r = pp.iloc[0]
    assert (f"{r['iou_mean']:.3f} [{r['iou_mean_lo']:.3f}, {r['iou_mean_hi']:.3f}]"
            in table_rows[0])
    assert len(md) < 8000


def test_side_by_side_shows_every_run(tmp_path):
    runs = [
        build_run_dir(tmp_path / name, n_boxes=24, findings=["Mass", "Effusion", "Nodule"],
                      seed=seed, quality_shift=shift, run_id=f"run-{name}",
                      with_thumbs=False, with_maps=False, with_curves=False)
        for name, seed, shift in (("honest", 1, 0.2), ("shortcut", 2, -0.1), ("random", 3, -0.3))
    ]
    calibration = pd.DataFrame({"run": ["honest", "shortcut", "random"],
                                "ece": [0.031, 0.118, 0.402], "n": [24, 24, 24],
                                "note": [INJECTION, "", ""]})
    out = render_side_by_side(runs, tmp_path / "demo" / "side.html", calibration=calibration,
                              labels=["honest", "shortcut", "random"])
    html = out.read_text()
    assert INJECTION not in html
    assert_no_remote_references(html)
    tb = parse(html)
    for name in ("mass", "effusion", "nodule"):
        assert tb.root.find_all("section", id=f"pathology-{name}")
    (sec,) = tb.root.find_all("section", id="pathology-mass")
    (row,) = [tr for tr in sec.find_all("tr") if tr.attrs.get("data-method") == "gradcam"]
    cells = [n for n in row.iter() if n.attrs.get("data-col") == "pointing_rate"]
    want = [pd.read_csv(r / "per_pathology.csv").set_index(["pathology", "method"]).loc[
        ("Mass", "gradcam"), "pointing_rate"] for r in runs]
    assert [float(c.attrs["data-value"]) for c in cells] == want
    assert len(sec.find_all("img")) == 3 * 7  # expert + 6 methods, per run
    (cal,) = tb.root.find_all("section", id="calibration")
    assert "0.118" in cal.all_text() and INJECTION in cal.all_text()
    with pytest.raises(ReportExistsError):
        render_side_by_side(runs, runs[0] / "run.json")


# ---- size of a full-scale report -------------------------------------------------------------


@pytest.mark.slow
def test_report_for_984_boxes_stays_under_25_mb(tmp_path, record_property):
    run = build_run_dir(tmp_path / "run", n_boxes=984, with_thumbs=False, with_maps=False,
                        curve_images=40, published=True)
    boxes = pd.read_parquet(run / "boxes.parquet")
    assert len(boxes[["image_key", "finding", "box_index"]].drop_duplicates()) == 984
    chosen = select_cases(boxes)
    add_thumbnails(run, chosen["image_key"])
    add_maps(run, zip(chosen["image_key"], chosen["finding"], strict=True))
    path = render_report(run, tmp_path / "out" / "report.html")
    size = path.stat().st_size
    record_property("report_bytes_984_boxes", size)
    print(f"\n984-box report: {size / 1e6:.2f} MB")
    assert size < 25 * 1024 * 1024
    html = path.read_text()
    tb = parse(html)
    figures = [n for n in tb.root.iter() if n.tag == "figure" and "data-case" in n.attrs]
    assert len(figures) == len(chosen) and 8 * 3 * 3 <= len(figures) <= 8 * 3 * 5
    assert all(f.attrs["data-has-map"] == "yes" for f in figures)
    assert "Some thumbnails are not stored" not in html


def test_original_sizes_come_from_the_boxes_before_the_nih_assumption():
    from audit.report.gallery import OriginalSizes

    boxes = pd.DataFrame({"image_key": ["b.png", "c.png"], "width": [800, 640],
                          "height": [600, 480]})
    sizes = OriginalSizes(boxes)
    assert sizes.get("b.png", (256, 192)) == (800.0, 600.0)
    assert sizes.get("c.png", None) == (640.0, 480.0)
    assert not sizes.assumed
    assert sizes.get("unknown.png", (256, 128)) == (1024.0, 512.0)
    assert sizes.assumed
