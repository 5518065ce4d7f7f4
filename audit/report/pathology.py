"""What a run holds per pathology: which methods and pathologies it scored, the per_pathology
table rows as cells, the acceptance verdicts, the published reference figures, the paired
differences, the average-map panels and the per-pathology section of the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from audit.metrics.criteria import format_n_needed, overall_verdict
from audit.protocol import FAIL, HIT_THRESHOLDS, INCONCLUSIVE, PASS, VERDICTS, method_kind
from audit.store.files import float_or_nan
from audit.store.rundir import RunData, average_map_key, map_key

from . import gallery as _gallery
from . import pathology_context as _ctx
from . import plots as _plots
from .cases import ranking_metric, select_cases
from .format import (
    ILLUSTRATIVE_BELOW,
    MIN_PAIRS_FOR_P,
    THRESHOLDS,
    as_text,
    method_label,
    method_labels,
    num_cell,
    order_methods,
    p_value,
    with_count,
)

#: The model input size assumed when run.json's settings do not record one.
DEFAULT_IMAGE_SIZE = 224
REFERENCE_FIGURES = Path(__file__).parent / "reference_figures.json"

#: The per_pathology columns a table row shows (as written by audit/metrics/aggregation.py).
TABLE_COLUMNS = (
    ["n", "iou_mean", "iou_mean_lo", "iou_mean_hi", "iou_median", "iou_median_lo",
     "iou_median_hi", "iobb_mean", "coverage_mean", "pointing_rate", "pointing_lo",
     "pointing_hi"]
    + [f"iobb_hit_{t}_rate" for t in THRESHOLDS]
    + [f"iou_hit_{t}_rate" for t in THRESHOLDS]
    + [f"{p}_{t}_{side}" for t in THRESHOLDS for p in ("iobb_hit", "iou_hit")
       for side in ("lo", "hi")]
)

#: Rate columns: shown with their count ("0.543 (38/70)").
RATE_COLUMNS = ["pointing_rate"] + [f"{p}_{t}_rate" for p in ("iobb_hit", "iou_hit")
                                    for t in THRESHOLDS]


# ---- which methods and pathologies ------------------------------------------------------------


def methods_of(data: RunData) -> tuple[list[str], dict[str, str]]:
    """(the run's methods in report order, {method: kind} as per_pathology records it)."""
    kinds: dict[str, str] = {}
    seen: list[str] = []
    if data.per_pathology is not None and "method" in data.per_pathology:
        for r in data.per_pathology.to_dict("records"):
            m = str(r["method"])
            seen.append(m)
            if as_text(r.get("kind")):
                kinds.setdefault(m, as_text(r.get("kind")))
    if data.boxes is not None and "method" in data.boxes:
        seen += [str(m) for m in data.boxes["method"].unique()]
    return order_methods(seen, kinds), kinds


def pathology_names(data: RunData) -> tuple[list[str], list[str]]:
    """(pathologies with a section, aggregate-only rows such as an 'all' row)."""
    pp = data.per_pathology
    pp_names = list(dict.fromkeys(pp["pathology"].astype(str))) if pp is not None and \
        "pathology" in pp else []
    if data.boxes is None or data.boxes.empty:
        return pp_names, []
    names = data.boxes[["finding", "model_finding", "pathology"]].astype(str)
    found = set(names.to_numpy().ravel())
    sections = [n for n in pp_names if n in found]
    aggregate = [n for n in pp_names if n not in found]
    covered = set(sections)
    for rec in names.drop_duplicates().itertuples(index=False):
        if not any(v in covered for v in rec):
            sections.append(rec[0])
            covered.add(rec[0])
    return sections, aggregate


def all_boxes_for(boxes: pd.DataFrame | None, names: list[str]) -> pd.DataFrame:
    """Every box row (all boxes, not only the best match) of a pathology's names."""
    if boxes is None or boxes.empty:
        return pd.DataFrame()
    cols = boxes[["finding", "model_finding", "pathology"]].astype(str)
    return boxes[cols.isin(names).any(axis=1)]


def boxes_for(boxes: pd.DataFrame | None, name: str) -> pd.DataFrame | None:
    """The scored boxes of one pathology (the best-matching box per image)."""
    if boxes is None or boxes.empty:
        return None
    sub = boxes[boxes[["finding", "model_finding", "pathology"]].astype(str).eq(name).any(axis=1)]
    return sub[sub["best_match"].fillna(False).astype(bool)]


# ---- table rows and verdicts ------------------------------------------------------------------


def n_needed_text(r: dict) -> str:
    """The row's "n needed" as shown ("123", "≈ 123", "never"; "" when decisive)."""
    if as_text(r.get("verdict")).upper() != INCONCLUSIVE:
        return ""
    approx = as_text(r.get("n_needed_approx")).lower() in ("true", "1", "1.0")
    return format_n_needed(float_or_nan(r.get("n_needed")), approx)


def table_row(r: dict) -> dict:
    """One per_pathology row as table cells keyed by the run's column names."""
    cells = {c: num_cell(r.get(c), integer=(c == "n")) for c in TABLE_COLUMNS}
    for c in RATE_COLUMNS:
        cells[c] = with_count(cells[c], r.get(c), r.get("n"))
    m = str(r.get("method"))
    return {
        "pathology": as_text(r.get("pathology")),
        "method": m,
        "label": method_label(m),
        "kind": as_text(r.get("kind")) or method_kind(m),
        "verdict": as_text(r.get("verdict")).upper(),
        "criteria": as_text(r.get("criteria")),
        "n_text": cells["n"]["text"],
        "n_needed": n_needed_text(r),
        "cells": cells,
        "has_median_ci": cells["iou_median_lo"]["value"] != "nan",
        "has_iobb_mean": cells["iobb_mean"]["value"] != "nan",
    }


def pathology_rows(pp: pd.DataFrame, name: str, methods: list[str]) -> list[dict]:
    sub = pp[pp["pathology"].astype(str) == name]
    by_method = {str(r["method"]): r for r in sub.to_dict("records")}
    return [table_row(by_method[m]) for m in methods if m in by_method]


def verdicts(pp: pd.DataFrame | None, methods: list[str] | None = None) -> dict:
    """The judged rows of per_pathology (PASS / FAIL / INCONCLUSIVE, with n and n needed), their
    counts, the run's overall verdict and a pathology x method grid."""
    rows = []
    if pp is not None and not pp.empty and "verdict" in pp:
        for r in pp.to_dict("records"):
            v = as_text(r.get("verdict")).upper()
            if v in VERDICTS:
                rows.append({"pathology": as_text(r.get("pathology")),
                             "method": str(r.get("method")),
                             "label": method_label(str(r.get("method"))),
                             "criteria": as_text(r.get("criteria")), "verdict": v,
                             "n_text": num_cell(r.get("n"), integer=True)["text"],
                             "n_needed": n_needed_text(r)})
    counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
    overall = overall_verdict(r["verdict"] for r in rows)
    present = list(dict.fromkeys(r["method"] for r in rows))
    grid_methods = [m for m in (methods or []) if m in present] + [
        m for m in present if m not in (methods or [])]
    by = {(r["pathology"], r["method"]): r for r in rows}
    grid = [{"pathology": p, "cells": [by.get((p, m)) for m in grid_methods]}
            for p in dict.fromkeys(r["pathology"] for r in rows)]
    crits = {r["criteria"] for r in rows}
    return {"rows": rows, "n": len(rows), "n_fail": counts[FAIL], "n_pass": counts[PASS],
            "n_inconclusive": counts[INCONCLUSIVE], "overall": overall,
            "methods": grid_methods, "grid": grid,
            "common_criterion": crits.pop() if len(crits) == 1 else ""}


# ---- published reference figures --------------------------------------------------------------


def load_reference_figures() -> dict:
    try:
        return json.loads(REFERENCE_FIGURES.read_text())
    except (OSError, ValueError):
        return {}


def reference_for(pathology: str, model_finding: str | None, ref: dict) -> dict | None:
    values = ref.get("values", {})
    aliases = ref.get("aliases", {})
    candidates = (pathology, aliases.get(pathology), model_finding,
                  aliases.get(model_finding or ""))
    for name in candidates:
        if name and name in values:
            return {
                "label": ref.get("short_label", "published"),
                "name": name,
                "thresholds": ref.get("thresholds", list(HIT_THRESHOLDS)),
                "values": values[name],
                "cells": {f"iobb_hit_{t}_rate": num_cell(v, 4)
                          for t, v in zip(THRESHOLDS, values[name], strict=False)},
            }
    return None


# ---- paired differences and average maps ------------------------------------------------------


def paired_cell(r: dict) -> dict:
    """One paired difference as shown: difference, CI, n, p-value (suppressed at small n) and
    whether the CI excludes 0 (None: not judged at small n)."""
    lo, hi = r.get("diff_lo"), r.get("diff_hi")
    n = float_or_nan(r.get("n_pairs"))
    return {"diff": num_cell(r.get("mean_diff")), "lo": num_cell(lo), "hi": num_cell(hi),
            "n": num_cell(n, integer=True), "p": p_value(r.get("p_boot"), n),
            "sig": (float_or_nan(lo) > 0 or float_or_nan(hi) < 0)
            if n >= MIN_PAIRS_FOR_P else None}


def paired_rows(paired: pd.DataFrame | None, names: list[str]) -> dict:
    """paired.csv (audit/metrics/aggregation.py ``paired_difference``) for a pathology: one row
    per method pair, one cell per metric (``{"metrics": [...], "rows": [...]}``)."""
    if paired is None or paired.empty or "pathology" not in paired:
        return {"metrics": [], "rows": []}
    sub = paired[paired["pathology"].astype(str).isin(names)]
    metrics = list(dict.fromkeys(sub["metric"].astype(str))) if "metric" in sub else []
    rows: dict[tuple[str, str], dict] = {}
    for r in sub.to_dict("records"):
        a, b = str(r.get("method_a")), str(r.get("method_b"))
        row = rows.setdefault((a, b), {"a": method_label(a), "b": method_label(b), "cells": {}})
        row["cells"][as_text(r.get("metric"))] = paired_cell(r)
    return {"metrics": metrics, "rows": list(rows.values())}


def average_map_panel(avg: dict[str, np.ndarray], names: list[str], methods: list[str]) -> dict:
    """The mean expert box and each method's mean map of the first of ``names`` recorded."""
    expert = next((_gallery.average_map_tile(avg[average_map_key(n)], expert=True)
                   for n in names if average_map_key(n) in avg), None)
    tiles = []
    for m in methods:
        key = next((map_key(m, n) for n in names if map_key(m, n) in avg), None)
        if key is not None:
            tiles.append({"method": m, "label": method_label(m),
                          "src": _gallery.average_map_tile(avg[key])})
    return {"expert": expert, "tiles": tiles}


# ---- one pathology's section ------------------------------------------------------------------


def box_names(name: str, b: pd.DataFrame | None) -> tuple[str | None, list[str]]:
    """(the model's finding name, every name the pathology goes by in the boxes)."""
    if b is None:
        return None, [name]
    model_finding = str(b["model_finding"].iloc[0]) if not b.empty else None
    names = [name, *map(str, b["finding"].unique()), *([model_finding] if model_finding else []),
             *map(str, b["pathology"].unique())]
    return model_finding, list(dict.fromkeys(names))


def gallery_groups(b: pd.DataFrame, methods: list[str], criteria: list | None,
                   gallery: dict, slug: str) -> list[dict]:
    """Per method (baselines left out): the cases `audit.report.cases.select_cases` picks, ranked
    by the verdict's metric, as overlays. ``gallery``: thumbs_dir, maps (`MapSource`), sizes
    (`OriginalSizes`), completeness (relative gaps)."""
    metric, hit_at = ranking_metric(criteria)
    cases = select_cases(b, metric, hit_at, group=("method",))
    if cases.empty:
        return []
    items = _gallery.gallery_items(cases, gallery["thumbs_dir"], gallery["maps"],
                                   gallery["sizes"], gallery["completeness"], f"case-{slug}")
    groups = []
    for m in methods:
        its = [i for i in items if i.method == m]
        if its:
            first = cases[cases["method"].astype(str) == m].iloc[0]
            groups.append({"method": m, "label": method_label(m), "cases": its,
                           "n_hits": int(first["n_hits"]), "n_units": int(first["n_units"]),
                           "has_maps": any(i.has_map for i in its),
                           "has_thumbs": all(i.has_thumb for i in its)})
    return groups


def pathology_context(data: RunData, b: pd.DataFrame, names: list[str],
                      methods: list[str]) -> dict:
    """Box sizes, grid ceiling, chance, model figures, true-positive subset, map warnings."""
    settings = data.run.get("settings")
    size = float_or_nan(settings.get("image_size")) if isinstance(settings, dict) else math.nan
    geometry = _ctx.box_geometry(b, int(size) if math.isfinite(size) else DEFAULT_IMAGE_SIZE)
    return {
        "geometry": geometry,
        "cam_methods": [method_label(m) for m in methods if m in _ctx.CAM_METHODS],
        "model": _ctx.model_figures(data.predictions, b),
        "subset": [{**r, "label": method_label(r["method"]), "kind": method_kind(r["method"]),
                    "count": with_count({}, r["pointing_rate"], r["n"]).get("count", "")}
                   for r in _ctx.subset_rows(data.per_pathology_tp, names, methods)],
        "tp_recorded": data.per_pathology_tp is not None,
        "warnings": [{**w, "label": method_label(w["method"])}
                     for w in _ctx.map_warnings(b, methods)],
        "thresholds": {"whole_share": _ctx.WHOLE_IMAGE_SHARE,
                       "warn_whole": _ctx.WARN_WHOLE_IMAGE, "warn_empty": _ctx.WARN_EMPTY},
    }


def pathology_section(data: RunData, name: str, slug: str, rows: list[dict],
                      b: pd.DataFrame | None, names: list[str], ref: dict | None,
                      methods: list[str], kinds: dict[str, str], gallery=None) -> dict:
    """The section of one pathology; ``b``: its best-matching box rows; ``gallery``: see
    `gallery_groups` (None: no gallery)."""
    has_boxes = b is not None and not b.empty
    every_box = all_boxes_for(data.boxes, names)
    sec = {
        "name": name, "slug": slug, "rows": rows, "reference": ref,
        "n_boxes": int(b[["image_key", "box_index"]].drop_duplicates().shape[0])
        if has_boxes else None,
        "n_images": int(b["image_key"].nunique()) if has_boxes else None,
        "paired": paired_rows(data.paired, names),
    }
    row_df = pd.DataFrame([
        {"method": r["method"], **{c: float_or_nan(v["value"]) for c, v in r["cells"].items()}}
        for r in rows])
    labels = method_labels(methods)
    sec["comparison_plot"] = _plots.method_comparison_svg(
        row_df, labels, {r["method"]: r["kind"] for r in rows},
        reference={"label": ref["label"], "thresholds": ref["thresholds"],
                   "values": ref["values"]} if ref else None) if rows else None
    sec["distribution_plot"] = _plots.iou_distribution_svg(
        b, methods, labels, kinds) if b is not None else None
    sec["average"] = average_map_panel(data.average_maps, names, methods)
    criteria = data.run.get("acceptance_criteria") if isinstance(
        data.run.get("acceptance_criteria"), list) else None
    sec["ranking"] = ranking_metric(criteria)[0]
    sec["gallery"] = gallery_groups(every_box, methods, criteria, gallery, slug) \
        if gallery and has_boxes else []
    sec["context"] = pathology_context(data, every_box, names, methods) if has_boxes else None
    sec["illustrative"] = has_boxes and sec["n_images"] < ILLUSTRATIVE_BELOW
    return sec
