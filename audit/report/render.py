"""Render a finished run directory into one self-contained HTML report (and a Markdown summary).

The renderer only reads what the run recorded (``run.json`` and the result tables, thumbnails and
maps written by ``audit/store.py``); it recomputes no score. A finished run directory is never
modified: the report is written to ``RUN_DIR/report.html`` only when that file does not exist yet,
otherwise the caller must name another path (``out_html``).

Safety: Jinja2 autoescaping is on, every image and plot is an inline ``data:`` URI, the page carries
a Content-Security-Policy that forbids any request, and only whitelisted provenance fields of
``run.json`` are shown (nothing else from the run's metadata, and no DICOM header is ever read).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from . import gallery as _gallery
from . import plots as _plots

TEMPLATES = Path(__file__).parent / "templates"
REFERENCE_FIGURES = Path(__file__).parent / "reference_figures.json"
DECIMALS = 3
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

METHOD_LABELS = {
    "gradcam": "Grad-CAM",
    "gradcampp": "Grad-CAM++",
    "integrated_gradients": "Integrated Gradients",
    "random": "Random map (baseline)",
    "centre_prior": "Centre prior (baseline)",
    "average_box": "Average expert box (baseline)",
}
METHOD_ORDER = ["gradcam", "gradcampp", "integrated_gradients"]
BASELINE_ORDER = ["random", "centre_prior", "average_box"]
THRESHOLDS = ("0.1", "0.25", "0.5")
DEFAULT_TARGET_LAYER = "features.norm5 (rectified: ReLU(norm5) as pooled)"

# Provenance fields that may appear in a report. Anything else in run.json is never rendered.
RUN_FIELDS = ("run_id", "started_at", "finished_at", "status", "device", "git_commit", "host",
              "target_layer")
MODEL_FIELDS = ("name", "fingerprint", "checkpoint_sha256", "source", "seed", "published")
DATASET_FIELDS = ("name", "manifest_path", "manifest_sha256", "n_images", "n_boxes", "images_dir")


class ReportExistsError(FileExistsError):
    """Raised instead of overwriting a file inside a (finished, immutable) run directory."""


# ---- reading a run directory ----------------------------------------------------------------


@dataclass
class RunData:
    run_dir: Path
    run: dict
    boxes: pd.DataFrame | None
    images: pd.DataFrame | None
    curves: pd.DataFrame | None
    per_pathology: pd.DataFrame | None
    paired: pd.DataFrame | None
    rejects: pd.DataFrame | None
    average_maps: dict[str, np.ndarray] = field(default_factory=dict)


def _read_table(run_dir: Path, stem: str, csv_only: bool = False) -> pd.DataFrame | None:
    pq, csv = run_dir / f"{stem}.parquet", run_dir / f"{stem}.csv"
    if not csv_only and pq.is_file():
        return pd.read_parquet(pq)
    if csv.is_file():
        try:
            return pd.read_csv(csv, keep_default_na=True)
        except pd.errors.EmptyDataError:
            return pd.DataFrame()
    return None


def _read_per_pathology(run_dir: Path) -> pd.DataFrame | None:
    df = _read_table(run_dir, "per_pathology", csv_only=True)
    if df is None and (run_dir / "per_pathology.json").is_file():
        df = pd.DataFrame(json.loads((run_dir / "per_pathology.json").read_text()))
    return df


def load_run(run_dir: Path) -> RunData:
    run_dir = Path(run_dir)
    run_json = run_dir / "run.json"
    if not run_json.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: run.json is missing")
    run = json.loads(run_json.read_text())
    return RunData(
        run_dir=run_dir,
        run=run if isinstance(run, dict) else {},
        boxes=_read_table(run_dir, "boxes"),
        images=_read_table(run_dir, "images"),
        curves=_read_table(run_dir, "curves"),
        per_pathology=_read_per_pathology(run_dir),
        paired=_read_table(run_dir, "paired", csv_only=True),
        rejects=_read_table(run_dir, "rejects", csv_only=True),
        average_maps=_gallery.load_average_maps(run_dir / "average_maps.npz"),
    )


# ---- small helpers --------------------------------------------------------------------------


def _float(v) -> float:
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _s(v) -> str:
    """A table cell as text ('' for None / NaN)."""
    if v is None:
        return ""
    if isinstance(v, float) and math.isnan(v):
        return ""
    try:
        if pd.isna(v):
            return ""
    except (TypeError, ValueError):
        pass
    return str(v)


def fmt(v, decimals: int = DECIMALS) -> str:
    f = _float(v)
    return "–" if not math.isfinite(f) else f"{f:.{decimals}f}"


def num_cell(v, decimals: int = DECIMALS, integer: bool = False) -> dict:
    """A number for a table: exact value (for data-value) and its fixed-decimal text."""
    f = _float(v)
    if not math.isfinite(f):
        return {"value": "nan", "text": "–"}
    if integer:
        return {"value": str(int(round(f))), "text": str(int(round(f)))}
    return {"value": repr(f), "text": f"{f:.{decimals}f}"}


def slugify(name: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-") or "x"
    slug, i = base, 2
    while slug in used:
        slug, i = f"{base}-{i}", i + 1
    used.add(slug)
    return slug


def method_label(m: str) -> str:
    return METHOD_LABELS.get(m, m)


def order_methods(methods, kinds: dict[str, str] | None = None) -> list[str]:
    kinds = kinds or {}
    methods = list(dict.fromkeys(str(m) for m in methods))

    def is_baseline(m):
        return kinds.get(m, "baseline" if m in BASELINE_ORDER else "method") == "baseline"

    main = [m for m in METHOD_ORDER if m in methods and not is_baseline(m)]
    main += [m for m in methods if m not in main and not is_baseline(m)]
    base = [m for m in BASELINE_ORDER if m in methods and is_baseline(m)]
    base += [m for m in methods if m not in main and m not in base]
    return main + base


def _flatten(obj: Any, prefix: str = "", limit_list: int | None = None) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if isinstance(obj, dict):
        if not obj and prefix:
            out.append((prefix, "{}"))
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k), limit_list)
    elif isinstance(obj, list):
        if limit_list is not None and len(obj) > limit_list:
            shown = json.dumps(obj[:limit_list], default=str)[:-1]
            out.append((prefix, f"{shown}, … ({len(obj)} items)]"))
        else:
            out.append((prefix, json.dumps(obj, default=str)))
    else:
        out.append((prefix, "null" if obj is None else str(obj)))
    return out


def _criterion_text(c: Any) -> str:
    if isinstance(c, dict):
        metric, op, value = c.get("metric"), c.get("op"), c.get("value")
        head = f"{metric} {op} {value}" if metric is not None and op is not None else ""
        rest = ", ".join(f"{k}={v}" for k, v in c.items() if k not in ("metric", "op", "value")
                         or not head)
        return f"{head} ({rest})" if head and rest else (head or rest)
    return str(c)


def _sub(d: Any, key: str) -> dict:
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, dict) else {}


def provenance(run: dict) -> dict:
    """Only the whitelisted provenance of run.json (nothing else is ever shown)."""
    model, dataset = _sub(run, "model"), _sub(run, "dataset")
    timings = _sub(run, "timings")
    timing_rows = [(str(k), fmt(v, 2)) for k, v in timings.items()]
    total = sum(_float(v) for v in timings.values() if math.isfinite(_float(v)))
    crit = run.get("acceptance_criteria") or []
    if not isinstance(crit, list):
        crit = [crit]
    return {
        "run": [(k, _s(run.get(k))) for k in RUN_FIELDS if k in run and k != "target_layer"],
        "run_values": {k: _s(run.get(k)) for k in RUN_FIELDS},
        "model": [(k, _s(model.get(k))) for k in MODEL_FIELDS if k in model],
        "model_values": {k: _s(model.get(k)) for k in MODEL_FIELDS},
        "dataset": [(k, _s(dataset.get(k))) for k in DATASET_FIELDS if k in dataset],
        "dataset_values": {k: _s(dataset.get(k)) for k in DATASET_FIELDS},
        "settings": _flatten(_sub(run, "settings")),
        "sampled": _flatten(_sub(run, "sampled"), limit_list=20),
        "versions": [(str(k), _s(v)) for k, v in _sub(run, "versions").items()],
        "files": [(str(k), _s(v)) for k, v in _sub(run, "files").items()],
        "timings": timing_rows,
        "timings_total": fmt(total, 2) if timing_rows else "",
        "criteria": [_criterion_text(c) for c in crit],
        "target_layer": _s(run.get("target_layer")) or DEFAULT_TARGET_LAYER,
        "published": bool(model.get("published") is True),
    }


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
                "thresholds": ref.get("thresholds", [0.1, 0.25, 0.5]),
                "values": values[name],
                "cells": {f"iobb_hit_{t}_rate": num_cell(v, 4)
                          for t, v in zip(THRESHOLDS, values[name], strict=False)},
            }
    return None


# ---- the per-pathology table ----------------------------------------------------------------


TABLE_COLUMNS = (
    ["n", "iou_mean", "iou_mean_lo", "iou_mean_hi", "iou_median", "iou_median_lo",
     "iou_median_hi", "iobb_mean", "pointing_rate", "pointing_lo", "pointing_hi"]
    + [f"iobb_hit_{t}_rate" for t in THRESHOLDS]
    + [f"iou_hit_{t}_rate" for t in THRESHOLDS]
)


def table_row(r: dict) -> dict:
    """One per_pathology row as table cells keyed by the run's column names.

    Hit-rate CIs are read as ``<metric>_lo``/``_hi`` (what audit/store.py writes), falling back
    to ``<metric>_rate_lo``/``_rate_hi``.
    """
    cells = {c: num_cell(r.get(c), integer=(c == "n")) for c in TABLE_COLUMNS}
    for t in THRESHOLDS:
        for p in ("iobb_hit", "iou_hit"):
            for side in ("lo", "hi"):
                v = r.get(f"{p}_{t}_{side}")
                if v is None:
                    v = r.get(f"{p}_{t}_rate_{side}")
                cells[f"{p}_{t}_{side}"] = num_cell(v)
    m = str(r.get("method"))
    return {
        "pathology": _s(r.get("pathology")),
        "method": m,
        "label": method_label(m),
        "kind": _s(r.get("kind")) or ("baseline" if m in BASELINE_ORDER else "method"),
        "verdict": _s(r.get("verdict")),
        "criteria": _s(r.get("criteria")),
        "cells": cells,
        "has_median_ci": cells["iou_median_lo"]["value"] != "nan",
        "has_iobb_mean": cells["iobb_mean"]["value"] != "nan",
    }


def _pathology_rows(pp: pd.DataFrame, name: str, methods: list[str]) -> list[dict]:
    sub = pp[pp["pathology"].astype(str) == name]
    by_method = {str(r["method"]): r for r in sub.to_dict("records")}
    return [table_row(by_method[m]) for m in methods if m in by_method]


def _boxes_for(boxes: pd.DataFrame | None, name: str) -> pd.DataFrame | None:
    """The scored boxes of one pathology (the best-matching box per image when recorded)."""
    if boxes is None or boxes.empty:
        return None
    mask = boxes["finding"].astype(str) == name
    for col in ("model_finding", "pathology"):
        if col in boxes:
            mask |= boxes[col].astype(str) == name
    sub = boxes[mask]
    if "best_match" in sub:
        sub = sub[sub["best_match"].fillna(False).astype(bool)]
    return sub


# ---- sections -------------------------------------------------------------------------------


def _verdicts(pp: pd.DataFrame | None, methods: list[str] | None = None) -> dict:
    rows = []
    if pp is not None and not pp.empty and "verdict" in pp:
        for r in pp.to_dict("records"):
            v = _s(r.get("verdict")).upper()
            if v in ("PASS", "FAIL"):
                rows.append({"pathology": _s(r.get("pathology")), "method": str(r.get("method")),
                             "label": method_label(str(r.get("method"))),
                             "criteria": _s(r.get("criteria")), "verdict": v})
    n_fail = sum(r["verdict"] == "FAIL" for r in rows)
    overall = "NO CRITERIA" if not rows else ("FAIL" if n_fail else "PASS")
    # a pathology x method grid of the verdicts
    present = list(dict.fromkeys(r["method"] for r in rows))
    grid_methods = [m for m in (methods or []) if m in present] + [
        m for m in present if m not in (methods or [])]
    by = {(r["pathology"], r["method"]): r for r in rows}
    grid = [{"pathology": p, "cells": [by.get((p, m)) for m in grid_methods]}
            for p in dict.fromkeys(r["pathology"] for r in rows)]
    crits = {r["criteria"] for r in rows}
    return {"rows": rows, "n": len(rows), "n_fail": n_fail, "n_pass": len(rows) - n_fail,
            "overall": overall, "methods": grid_methods, "grid": grid,
            "common_criterion": crits.pop() if len(crits) == 1 else ""}


def _mean_table(df: pd.DataFrame, group: list[str], cols: list[str], abs_cols=()) -> list[dict]:
    """Mean per group of each column (max for determinism columns, mean |x| for abs_cols)."""
    vals = df[cols].apply(pd.to_numeric, errors="coerce")
    for c in abs_cols:
        if c in vals:
            vals[c] = vals[c].abs()
    vals["_any"] = vals[cols].notna().any(axis=1)
    keys = df[group].astype(str)
    frame = pd.concat([keys, vals], axis=1)
    g = frame.groupby(group, sort=False, dropna=False)
    means = g[cols].mean()
    maxes = g[cols].max()
    counts = g["_any"].sum()
    out = []
    for key in means.index:
        if counts[key] == 0:
            continue
        tup = key if isinstance(key, tuple) else (key,)
        row = {k: v for k, v in zip(group, tup, strict=True)}
        row["n"] = int(counts[key])
        row["cells"] = {c: num_cell(maxes.at[key, c] if c.startswith("determinism")
                                    else means.at[key, c]) for c in cols}
        out.append(row)
    return out


REPEAT_HEADERS = {
    "determinism_max_abs_diff": "Determinism: max |Δ|",
    "noise_ssim": "Noise: SSIM",
    "noise_spearman": "Noise: Spearman",
    "shift_ssim": "Shift: SSIM",
    "shift_spearman": "Shift: Spearman",
    "shift_delta_iou": "Shift: |ΔIoU|",
}
FIDELITY_HEADERS = {
    "fidelity_deletion_auc": "Deletion AUC",
    "fidelity_deletion_auc_random": "Deletion AUC (random order)",
    "fidelity_insertion_auc": "Insertion AUC",
    "fidelity_insertion_auc_random": "Insertion AUC (random order)",
}
REPEAT_COLS = ["determinism_max_abs_diff", "noise_ssim", "noise_spearman", "shift_ssim",
               "shift_spearman", "shift_delta_iou"]
FIDELITY_COLS = ["fidelity_deletion_auc", "fidelity_deletion_auc_random",
                 "fidelity_insertion_auc", "fidelity_insertion_auc_random"]


def _sort_by_method(rows: list[dict], methods: list[str]) -> list[dict]:
    """Rows ordered by pathology (first appearance) then method; first row of a group marked."""
    order = {m: i for i, m in enumerate(methods)}
    first_seen: dict[str, int] = {}
    for r in rows:
        r["label"] = method_label(r.get("method", ""))
        first_seen.setdefault(r.get("finding", ""), len(first_seen))
    out = sorted(rows, key=lambda r: (first_seen[r.get("finding", "")],
                                      order.get(r.get("method"), len(order))))
    prev = None
    for r in out:
        r["group_start"] = r.get("finding", "") != prev
        prev = r.get("finding", "")
    return out


def repeatability_section(images: pd.DataFrame | None, methods: list[str]) -> dict | None:
    if images is None or images.empty:
        return None
    cols = [c for c in REPEAT_COLS if c in images.columns]
    if not cols or not images[cols].apply(pd.to_numeric, errors="coerce").notna().any().any():
        return None
    absc = ("shift_delta_iou",)
    by_method = _sort_by_method(_mean_table(images, ["method"], cols, absc), methods)
    by_path = _mean_table(images, ["finding", "method"], cols, absc)
    return {
        "cols": cols,
        "by_method": by_method,
        "by_pathology": _sort_by_method(by_path, methods),
        "plot": _plots.repeatability_svg(images, methods, METHOD_LABELS),
    }


def randomization_section(curves: pd.DataFrame | None, images: pd.DataFrame | None,
                          methods: list[str]) -> dict | None:
    c = None
    if curves is not None and not curves.empty and "family" in curves:
        c = curves[curves["family"].astype(str).str.startswith("randomization")]
    has_img = images is not None and "randomization_final_spearman_abs" in getattr(
        images, "columns", []) and images["randomization_final_spearman_abs"].notna().any()
    if (c is None or c.empty) and not has_img:
        return None
    out = {"cascade_plot": None, "independent_plot": None, "final": [], "metrics": [],
           "steps": [], "per_image": []}
    if c is not None and not c.empty:
        out["cascade_plot"] = _plots.randomization_cascade_plot(c, methods, METHOD_LABELS)
        out["independent_plot"] = _plots.randomization_independent_plot(c, methods,
                                                                        METHOD_LABELS)
        casc = c[c["family"] == "randomization_cascade"]
        if not casc.empty:
            metrics = [m for m in _plots.RANDOMIZATION_METRICS if m in set(casc["metric"])]
            metrics += [m for m in dict.fromkeys(casc["metric"].astype(str)) if m not in metrics]
            out["metrics"] = metrics
            last = casc[casc["step"] == casc.groupby(["method"])["step"].transform("max")]
            for m in methods:
                lm = last[last["method"] == m]
                if lm.empty:
                    continue
                out["final"].append({
                    "method": m, "label": method_label(m),
                    "n": int(lm["image_key"].astype(str).str.cat(
                        lm["finding"].astype(str), sep="|").nunique()),
                    "cells": {k: num_cell(lm.loc[lm["metric"] == k, "value"].mean())
                              for k in metrics},
                })
            steps = casc.groupby("step", sort=True).agg(
                x=("x", "mean"), label=("label", "first")).reset_index()
            out["steps"] = [{"step": int(s.step), "label": _s(s.label),
                             "x": num_cell(s.x)} for s in steps.itertuples()]
    if has_img:
        rows = _mean_table(images, ["method"], ["randomization_final_spearman_abs"])
        out["per_image"] = _sort_by_method(rows, methods)
    return out


def fidelity_section(curves: pd.DataFrame | None, images: pd.DataFrame | None,
                     methods: list[str]) -> dict | None:
    c = None
    if curves is not None and not curves.empty and "family" in curves:
        c = curves[curves["family"].isin(["deletion", "insertion", "deletion_random",
                                          "insertion_random"])]
    cols = [k for k in FIDELITY_COLS if images is not None and k in images.columns]
    has_img = bool(cols) and images[cols].apply(pd.to_numeric, errors="coerce").notna().any().any()
    if (c is None or c.empty) and not has_img:
        return None
    rows = []
    by_path = []
    if has_img:
        rows = _sort_by_method(_mean_table(images, ["method"], cols), methods)
        by_path = _sort_by_method(_mean_table(images, ["finding", "method"], cols), methods)
        for r in rows:
            # fraction of images where the method beats its random-order curve
            g = images[images["method"].astype(str) == r["method"]]
            beats = {}
            if {"fidelity_deletion_auc", "fidelity_deletion_auc_random"} <= set(g.columns):
                d = g[["fidelity_deletion_auc", "fidelity_deletion_auc_random"]].dropna()
                beats["deletion"] = num_cell((d.iloc[:, 0] < d.iloc[:, 1]).mean()
                                             if len(d) else math.nan)
            if {"fidelity_insertion_auc", "fidelity_insertion_auc_random"} <= set(g.columns):
                d = g[["fidelity_insertion_auc", "fidelity_insertion_auc_random"]].dropna()
                beats["insertion"] = num_cell((d.iloc[:, 0] > d.iloc[:, 1]).mean()
                                              if len(d) else math.nan)
            r["beats"] = beats
    plot = _plots.fidelity_plot(c, methods, METHOD_LABELS) if c is not None and not \
        c.empty else None
    return {"cols": cols, "by_method": rows, "by_pathology": by_path, "plot": plot}


def completeness_section(images: pd.DataFrame | None, methods: list[str]) -> list[dict]:
    """Integrated Gradients' completeness gap |sum(attr) - (F(x) - F(baseline))| per method."""
    if images is None or "completeness_gap" not in images.columns:
        return []
    out = []
    for m in methods:
        g = images[images["method"].astype(str) == m]
        gap = pd.to_numeric(g["completeness_gap"], errors="coerce").abs()
        ok = gap.notna()
        if not ok.any():
            continue
        rel = math.nan
        if "delta_f" in g:
            df_ = pd.to_numeric(g["delta_f"], errors="coerce").abs()
            both = ok & df_.notna() & (df_ > 0)
            if both.any():
                rel = float((gap[both] / df_[both]).median())
        out.append({"method": m, "label": method_label(m), "n": int(ok.sum()),
                    "mean": num_cell(gap[ok].mean()), "max": num_cell(gap[ok].max()),
                    "rel": num_cell(rel)})
    return out


def rejects_section(rejects: pd.DataFrame | None, limit: int = 2000) -> dict | None:
    if rejects is None:
        return None
    cols = [c for c in ("path", "image_key", "finding", "reason") if c in rejects.columns]
    rows = [[_s(v) for v in r] for r in rejects[cols].head(limit).itertuples(index=False)]
    return {"cols": cols, "rows": rows, "n": len(rejects), "truncated": len(rejects) > limit}


def _ci_overlap(a_lo, a_hi, b_lo, b_hi) -> bool | None:
    vals = [_float(v) for v in (a_lo, a_hi, b_lo, b_hi)]
    if not all(math.isfinite(v) for v in vals):
        return None
    return not (vals[1] < vals[2] or vals[3] < vals[0])


def _arrow(delta: float) -> tuple[str, str]:
    if not math.isfinite(delta):
        return ("", "")
    if delta > 0:
        return ("▲", "up")
    if delta < 0:
        return ("▼", "down")
    return ("=", "same")


def change_section(current: RunData, previous_run_dir: Path | None,
                   comparison: pd.DataFrame | None, methods: list[str]) -> dict | None:
    if previous_run_dir is None and comparison is None:
        return None
    out: dict[str, Any] = {"rows": [], "warnings": [], "previous": None, "comparison": None}
    if previous_run_dir is not None:
        prev = load_run(Path(previous_run_dir))
        pm, cm = _sub(prev.run, "model"), _sub(current.run, "model")
        pd_, cd = _sub(prev.run, "dataset"), _sub(current.run, "dataset")
        out["previous"] = {
            "run_id": _s(prev.run.get("run_id")), "finished_at": _s(prev.run.get("finished_at")),
            "model": _s(pm.get("name")), "fingerprint": _s(pm.get("fingerprint")),
            "dataset": _s(pd_.get("name")), "manifest_sha256": _s(pd_.get("manifest_sha256")),
        }
        if _s(pm.get("name")) != _s(cm.get("name")):
            out["warnings"].append("The previous run used another model name.")
        if _s(pd_.get("manifest_sha256")) != _s(cd.get("manifest_sha256")):
            out["warnings"].append("The previous run used another dataset manifest "
                                   "(different manifest sha256).")
        if _s(pm.get("fingerprint")) and _s(pm.get("fingerprint")) == _s(cm.get("fingerprint")):
            out["warnings"].append("Same weights fingerprint as the previous run.")
        a, b = prev.per_pathology, current.per_pathology
        if a is not None and b is not None and not a.empty and not b.empty:
            prev_rows = {(str(r["pathology"]), str(r["method"])): r for r in a.to_dict("records")}
            for r in b.to_dict("records"):
                key = (str(r["pathology"]), str(r["method"]))
                p = prev_rows.get(key)
                if p is None:
                    continue
                for metric, lo, hi, name in (
                    ("pointing_rate", "pointing_lo", "pointing_hi", "pointing hit rate"),
                    ("iou_mean", "iou_mean_lo", "iou_mean_hi", "mean IoU"),
                ):
                    d = _float(r.get(metric)) - _float(p.get(metric))
                    arrow, cls = _arrow(d)
                    ov = _ci_overlap(p.get(lo), p.get(hi), r.get(lo), r.get(hi))
                    out["rows"].append({
                        "pathology": key[0], "method": key[1], "label": method_label(key[1]),
                        "metric": name,
                        "prev": num_cell(p.get(metric)), "prev_lo": num_cell(p.get(lo)),
                        "prev_hi": num_cell(p.get(hi)),
                        "cur": num_cell(r.get(metric)), "cur_lo": num_cell(r.get(lo)),
                        "cur_hi": num_cell(r.get(hi)),
                        "delta": num_cell(d), "arrow": arrow, "cls": cls,
                        "overlap": ov,
                        "prev_verdict": _s(p.get("verdict")), "cur_verdict": _s(r.get("verdict")),
                    })
            order = {m: i for i, m in enumerate(methods)}
            out["rows"].sort(key=lambda x: (x["pathology"], order.get(x["method"], 99)))
    if comparison is not None:
        out["comparison"] = generic_table(comparison, arrows=True)
    return out


def generic_table(df: pd.DataFrame, arrows: bool = False) -> dict:
    """Any DataFrame as escaped cells (numbers with fixed decimals and an exact data-value)."""
    cols = [str(c) for c in df.columns]
    rows = []
    for rec in df.itertuples(index=False):
        cells = []
        for c, v in zip(cols, rec, strict=True):
            if isinstance(v, (bool, np.bool_)):
                cells.append({"text": str(bool(v)), "num": False})
            elif isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                integer = isinstance(v, (int, np.integer))
                cell = num_cell(v, integer=integer)
                cell["num"] = True
                if arrows and c in ("diff", "delta", "change"):
                    cell["arrow"], cell["cls"] = _arrow(_float(v))
                cells.append(cell)
            else:
                cells.append({"text": _s(v), "num": False})
        rows.append(cells)
    return {"cols": cols, "rows": rows}


def _first(r: dict, *names):
    for n in names:
        if n in r and _s(r[n]) != "":
            return r[n]
    return None


def _paired_rows(paired: pd.DataFrame | None, names: list[str]) -> list[dict]:
    if paired is None or paired.empty or "pathology" not in paired:
        return []
    sub = paired[paired["pathology"].astype(str).isin(names)]
    rows = []
    for r in sub.to_dict("records"):
        lo, hi = _first(r, "lo", "diff_lo"), _first(r, "hi", "diff_hi")
        rows.append({
            "a": method_label(str(r.get("method_a"))), "b": method_label(str(r.get("method_b"))),
            "metric": _s(r.get("metric")), "diff": num_cell(_first(r, "diff", "mean_diff")),
            "lo": num_cell(lo), "hi": num_cell(hi),
            "n": num_cell(r.get("n_pairs"), integer=True),
            "p": num_cell(r.get("p_boot")),
            "sig": (_float(lo) > 0 or _float(hi) < 0),
        })
    return rows


def average_map_panel(avg: dict[str, np.ndarray], names: list[str], methods: list[str]) -> dict:
    expert = None
    for n in names:
        if f"expert|{n}" in avg:
            expert = _gallery.average_map_tile(avg[f"expert|{n}"], expert=True)
            break
    tiles = []
    for m in methods:
        for n in names:
            if f"{m}|{n}" in avg:
                tiles.append({"method": m, "label": method_label(m),
                              "src": _gallery.average_map_tile(avg[f"{m}|{n}"])})
                break
    return {"expert": expert, "tiles": tiles}


# ---- context --------------------------------------------------------------------------------


def _methods_of(data: RunData) -> tuple[list[str], dict[str, str]]:
    kinds: dict[str, str] = {}
    seen: list[str] = []
    if data.per_pathology is not None and "method" in data.per_pathology:
        for r in data.per_pathology.to_dict("records"):
            m = str(r["method"])
            seen.append(m)
            if _s(r.get("kind")):
                kinds.setdefault(m, _s(r.get("kind")))
    if data.boxes is not None and "method" in data.boxes:
        seen += [str(m) for m in data.boxes["method"].unique()]
    return order_methods(seen, kinds), kinds


def _pathology_names(data: RunData) -> tuple[list[str], list[str]]:
    """(pathologies with a section, aggregate-only rows such as an 'all' row)."""
    pp = data.per_pathology
    pp_names = list(dict.fromkeys(pp["pathology"].astype(str))) if pp is not None and \
        "pathology" in pp else []
    if data.boxes is None or data.boxes.empty:
        return pp_names, []
    b = data.boxes
    alias_cols = [c for c in ("model_finding", "pathology") if c in b]
    found = set(b["finding"].astype(str))
    for c in alias_cols:
        found |= set(b[c].astype(str))
    sections = [n for n in pp_names if n in found]
    aggregate = [n for n in pp_names if n not in found]
    covered = set(sections)
    for rec in b[["finding", *alias_cols]].astype(str).drop_duplicates().itertuples(index=False):
        if not any(v in covered for v in rec):
            sections.append(rec[0])
            covered.add(rec[0])
    return sections, aggregate


def build_context(data: RunData, previous_run_dir: Path | None = None,
                  comparison: pd.DataFrame | None = None, with_gallery: bool = True) -> dict:
    run = data.run
    prov = provenance(run)
    methods, kinds = _methods_of(data)
    sections, aggregate = _pathology_names(data)
    pp = data.per_pathology
    ref_all = load_reference_figures().get("chestxray8_localization_iobb", {})
    show_ref = prov["published"] and bool(ref_all)

    thumbs_dir = data.run_dir / "thumbs"
    thumbs_dir = thumbs_dir if thumbs_dir.is_dir() else None
    maps = _gallery.MapStore(data.run_dir / "maps" if (data.run_dir / "maps").is_dir() else None)
    manifest = _s(_sub(run, "dataset").get("manifest_path"))
    sizes = _gallery.OriginalSizes(data.boxes, thumbs_dir, Path(manifest) if manifest else None)

    used: set[str] = set()
    headline = []
    pathologies = []
    for name in sections + aggregate:
        rows = _pathology_rows(pp, name, methods) if pp is not None and "pathology" in pp else []
        b = _boxes_for(data.boxes, name)
        model_finding = None
        if b is not None and not b.empty and "model_finding" in b:
            model_finding = str(b["model_finding"].iloc[0])
        names = list(dict.fromkeys(
            [name] + ([str(x) for x in b["finding"].unique()] if b is not None else [])
            + ([model_finding] if model_finding else [])
            + ([str(x) for x in b["pathology"].unique()]
               if b is not None and "pathology" in b else [])))
        ref = reference_for(name, model_finding, ref_all) if show_ref else None
        headline.append({"name": name, "rows": rows, "reference": ref,
                         "has_section": name in sections})
        if name not in sections:
            continue
        slug = slugify(name, used)
        sec = {
            "name": name, "slug": slug, "rows": rows, "reference": ref,
            "n_boxes": int(b[["image_key", "box_index"]].drop_duplicates().shape[0])
            if b is not None and not b.empty and "box_index" in b else None,
            "n_images": int(b["image_key"].nunique()) if b is not None and not b.empty else None,
            "paired": _paired_rows(data.paired, names),
            "paired_has_n": data.paired is not None and "n_pairs" in data.paired,
            "paired_has_p": data.paired is not None and "p_boot" in data.paired,
        }
        row_df = pd.DataFrame([
            {"method": r["method"], **{c: _float(v["value"]) for c, v in r["cells"].items()}}
            for r in rows])
        sec["comparison_plot"] = _plots.method_comparison_svg(
            row_df, METHOD_LABELS, {r["method"]: r["kind"] for r in rows},
            reference={"label": ref["label"], "thresholds": ref["thresholds"],
                       "values": ref["values"]} if ref else None) if rows else None
        sec["distribution_plot"] = _plots.iou_distribution_svg(
            b, methods, METHOD_LABELS, kinds) if b is not None else None
        sec["average"] = average_map_panel(data.average_maps, names, methods)
        groups = []
        if with_gallery and b is not None and not b.empty:
            cases = _gallery.select_cases(b, ("method",))
            items = _gallery.gallery_items(cases, thumbs_dir, maps, sizes)
            for m in methods:
                its = [i for i in items if i.method == m]
                if its:
                    groups.append({"method": m, "label": method_label(m), "cases": its,
                                   "has_maps": any(i.has_map for i in its),
                                   "has_thumbs": all(i.has_thumb for i in its)})
        sec["gallery"] = groups
        pathologies.append(sec)
    maps.close()

    threshold = None
    has_thr = data.boxes is not None and "threshold" in data.boxes
    if has_thr and data.boxes["threshold"].notna().any():
        threshold = fmt(data.boxes["threshold"].dropna().iloc[0], 2)
    settings = _sub(run, "settings")
    if threshold is None and "threshold" in settings:
        threshold = _s(settings.get("threshold"))

    return {
        "csp": CSP,
        "title": f"Saliency audit — {prov['model_values']['name'] or 'model'} on "
                 f"{prov['dataset_values']['name'] or 'dataset'}",
        "prov": prov,
        "run_dir_name": data.run_dir.name,
        "rendered_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "decimals": DECIMALS,
        "thresholds": THRESHOLDS,
        "methods": methods,
        "kinds": kinds,
        "method_labels": {m: method_label(m) for m in methods},
        "verdicts": _verdicts(pp, methods),
        "headline": headline,
        "has_per_pathology": pp is not None and not pp.empty,
        "pathologies": pathologies,
        "gallery_sizes_assumed": sizes.assumed,
        "repeatability": repeatability_section(data.images, methods),
        "repeat_headers": REPEAT_HEADERS,
        "fidelity_headers": FIDELITY_HEADERS,
        "randomization": randomization_section(data.curves, data.images, methods),
        "fidelity": fidelity_section(data.curves, data.images, methods),
        "completeness": completeness_section(data.images, methods),
        "rejects": rejects_section(data.rejects),
        "change": change_section(data, previous_run_dir, comparison, methods),
        "reference": ref_all if show_ref else None,
        "threshold": threshold,
        "status_warning": _s(run.get("status")) not in ("finished", ""),
        "has_boxes": data.boxes is not None and not data.boxes.empty,
    }


# ---- Jinja environment and writing ----------------------------------------------------------


def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    env.filters["method_label"] = method_label
    return env


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _write_text(path: Path, text: str, exclusive: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if exclusive:
        try:
            with open(path, "x", encoding="utf-8") as fh:
                fh.write(text)
        except FileExistsError as exc:
            raise ReportExistsError(
                f"{path} already exists inside a run directory; a finished run directory is "
                "never modified — render to another path (out_html=...)") from exc
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _resolve_output(run_dirs: list[Path], out_html: Path | None) -> tuple[Path, bool]:
    """(target path, inside a run directory?) — refusing to overwrite anything in a run dir."""
    if out_html is None:
        target = run_dirs[0] / "report.html"
        if target.exists():
            raise ReportExistsError(
                f"{target} already exists and a finished run directory is never modified; "
                "pass out_html=<a new path> to render the report elsewhere")
        return target, True
    target = Path(out_html)
    inside = any(_is_within(target, d) for d in run_dirs)
    if inside and target.exists():
        raise ReportExistsError(
            f"{target} already exists inside a run directory, which is never modified; "
            "choose a path outside the run directory or a new file name")
    return target, inside


def render_html(run_dir: Path, previous_run_dir: Path | None = None,
                comparison: pd.DataFrame | None = None) -> str:
    """The report's HTML as a string (nothing is written)."""
    data = load_run(Path(run_dir))
    ctx = build_context(data, previous_run_dir, comparison)
    return environment().get_template("report.html.j2").render(**ctx)


def _table_records(pp: pd.DataFrame) -> str:
    return json.dumps(json.loads(pp.to_json(orient="records")), indent=1)


def render_report(
    run_dir: Path,
    out_html: Path | None = None,
    previous_run_dir: Path | None = None,
    comparison: pd.DataFrame | None = None,
) -> Path:
    """Render RUN_DIR into one self-contained HTML file and return its path.

    Default output: ``RUN_DIR/report.html``, only when that file does not exist yet (a finished
    run directory is never modified); otherwise pass ``out_html``. Beside the HTML it writes
    ``summary.md`` (inside the run directory only when absent) and, when rendering outside the
    run directory, ``report_table.csv`` / ``report_table.json`` (copies of per_pathology).
    ``previous_run_dir`` adds the "change since the previous run" section; ``comparison`` (e.g.
    the regression check's table) is shown there as given.
    """
    run_dir = Path(run_dir)
    data = load_run(run_dir)
    target, inside = _resolve_output([run_dir], out_html)
    ctx = build_context(data, previous_run_dir, comparison)
    html = environment().get_template("report.html.j2").render(**ctx)
    _write_text(target, html, exclusive=inside)
    summary = markdown_summary(data)
    companions = target.parent
    if inside:
        try:
            _write_text(companions / "summary.md", summary, exclusive=True)
        except ReportExistsError:
            pass  # an earlier summary stays untouched
    else:
        _write_text(companions / "summary.md", summary, exclusive=False)
        # exact copies of the run's per-pathology table (written from the DataFrame if absent)
        for ext in ("csv", "json"):
            src = run_dir / f"per_pathology.{ext}"
            if src.is_file():
                text = src.read_text(encoding="utf-8")
            elif data.per_pathology is not None:
                text = (data.per_pathology.to_csv(index=False) if ext == "csv"
                        else _table_records(data.per_pathology))
            else:
                continue
            _write_text(companions / f"report_table.{ext}", text, exclusive=False)
    return target


# ---- Markdown summary -----------------------------------------------------------------------


def _md(text: Any) -> str:
    s = _s(text).replace("\r", " ").replace("\n", " ")
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for ch in ("\\", "|", "`", "*", "_", "[", "]"):
        s = s.replace(ch, "\\" + ch)
    return s


def _ci_text(v, lo, hi) -> str:
    if not math.isfinite(_float(v)):
        return "–"
    return f"{fmt(v)} [{fmt(lo)}, {fmt(hi)}]"


def markdown_summary(data: RunData) -> str:
    prov = provenance(data.run)
    v = _verdicts(data.per_pathology)
    mv, dv, rv = prov["model_values"], prov["dataset_values"], prov["run_values"]
    lines = [
        f"# Saliency audit: {_md(mv['name'])} on {_md(dv['name'])}",
        "",
        f"- Run: `{_md(rv['run_id'])}` finished {_md(rv['finished_at'])} on "
        f"{_md(rv['device'])}",
        f"- Model: {_md(mv['name'])} ({_md(mv['source'])}), weights sha256 "
        f"`{_md(mv['fingerprint'][:16])}…`",
        f"- Dataset: {_md(dv['name'])}, {_md(dv['n_images'])} images, {_md(dv['n_boxes'])} "
        f"boxes, manifest sha256 `{_md(dv['manifest_sha256'][:16])}…`",
        f"- Acceptance: **{v['overall']}** ({v['n_pass']} pass, {v['n_fail']} fail of "
        f"{v['n']} criteria)",
        "",
    ]
    pp = data.per_pathology
    if pp is not None and not pp.empty:
        methods, _ = _methods_of(data)
        order = {m: i for i, m in enumerate(methods)}
        lines += ["| Pathology | Method | n | Mean IoU [95% CI] | Pointing hit rate [95% CI] "
                  "| Verdict |", "|---|---|---:|---|---|---|"]
        recs = sorted(pp.to_dict("records"), key=lambda r: (
            list(dict.fromkeys(pp["pathology"].astype(str))).index(str(r["pathology"])),
            order.get(str(r["method"]), 99)))
        for r in recs:
            lines.append(
                f"| {_md(r.get('pathology'))} | {_md(method_label(str(r.get('method'))))} | "
                f"{_md(num_cell(r.get('n'), integer=True)['text'])} | "
                f"{_ci_text(r.get('iou_mean'), r.get('iou_mean_lo'), r.get('iou_mean_hi'))} | "
                f"{_ci_text(r.get('pointing_rate'), r.get('pointing_lo'), r.get('pointing_hi'))}"
                f" | {_md(r.get('verdict'))} |")
    else:
        lines.append("No per-pathology table in this run.")
    fails = [r for r in v["rows"] if r["verdict"] == "FAIL"]
    if fails:
        lines += ["", "Failed criteria:"]
        lines += [f"- {_md(r['pathology'])} / {_md(r['label'])}: {_md(r['criteria'])}"
                  for r in fails]
    return "\n".join(lines) + "\n"


def render_markdown_summary(run_dir: Path) -> str:
    """A short Markdown summary of a run (for a Prefect artifact); writes nothing."""
    return markdown_summary(load_run(Path(run_dir)))


# ---- several runs side by side --------------------------------------------------------------


def render_side_by_side(
    run_dirs: list[Path],
    out_html: Path,
    calibration: pd.DataFrame | None = None,
    labels: list[str] | None = None,
) -> Path:
    """One HTML page comparing several runs (e.g. honest / shortcut / random-init models).

    Per pathology and method: each run's pointing hit rate and mean IoU with 95% CIs and its
    verdict; the ``calibration`` table as given; the average-map panels of every run.
    """
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("render_side_by_side needs at least one run directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError("labels must have one entry per run directory")
    target, inside = _resolve_output(run_dirs, Path(out_html))
    datas = [load_run(d) for d in run_dirs]
    runs = []
    all_methods: list[str] = []
    all_names: list[str] = []
    for i, d in enumerate(datas):
        prov = provenance(d.run)
        methods, _ = _methods_of(d)
        sections, _agg = _pathology_names(d)
        all_methods += methods
        all_names += sections
        label = labels[i] if labels is not None else (
            prov["model_values"]["name"] or d.run_dir.name)
        runs.append({"label": label, "prov": prov, "verdicts": _verdicts(d.per_pathology),
                     "data": d, "methods": methods})
    all_kinds: dict[str, str] = {}
    for d in datas:
        for k, v in _methods_of(d)[1].items():
            all_kinds.setdefault(k, v)
    methods = order_methods(all_methods, all_kinds)
    names = list(dict.fromkeys(all_names))
    used: set[str] = set()
    pathologies = []
    for name in names:
        rows = []
        for m in methods:
            cells = []
            for r in runs:
                pp = r["data"].per_pathology
                rec = None
                if pp is not None and not pp.empty:
                    sub = pp[(pp["pathology"].astype(str) == name) &
                             (pp["method"].astype(str) == m)]
                    rec = sub.to_dict("records")[0] if len(sub) else None
                cells.append(table_row(rec) if rec is not None else None)
            if any(c is not None for c in cells):
                rows.append({"method": m, "label": method_label(m), "cells": cells})
        panels = []
        for r in runs:
            b = _boxes_for(r["data"].boxes, name)
            alias = [str(x) for x in b["model_finding"].unique()] if b is not None and \
                "model_finding" in b else []
            panels.append({"label": r["label"], **average_map_panel(
                r["data"].average_maps, [name, *alias], methods)})
        pathologies.append({"name": name, "slug": slugify(name, used), "rows": rows,
                            "panels": panels})
    ctx = {
        "csp": CSP,
        "title": "Saliency audit — runs side by side",
        "runs": [{k: v for k, v in r.items() if k != "data"} for r in runs],
        "methods": methods,
        "pathologies": pathologies,
        "calibration": generic_table(calibration) if calibration is not None else None,
        "rendered_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "decimals": DECIMALS,
    }
    html = environment().get_template("side_by_side.html.j2").render(**ctx)
    _write_text(target, html, exclusive=inside)
    return target


# ---- PDF ------------------------------------------------------------------------------------


def print_pdf(html: Path, out_pdf: Path | None = None, chromium: str | None = None,
              timeout_s: float = 300) -> Path:
    """Print a rendered report to PDF with headless Chromium (the report's print stylesheet).

    Default output: the HTML's path with ``.pdf``. Next to a run directory's files (a folder with
    run.json) an existing PDF is never overwritten (``ReportExistsError``).
    """
    html = Path(html).resolve()
    out = Path(out_pdf) if out_pdf is not None else html.with_suffix(".pdf")
    if out.exists() and (out.parent / "run.json").is_file():
        raise ReportExistsError(f"{out} already exists inside a run directory, which is never "
                                "modified; pass out_pdf=<a new path>")
    exe = chromium or shutil.which("chromium") or shutil.which("chromium-browser") or \
        shutil.which("google-chrome")
    if exe is None:
        raise FileNotFoundError("no Chromium found to print the PDF (apt-get install chromium)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.pdf")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-pings", f"--user-data-dir={profile}",
               "--no-pdf-header-footer", f"--print-to-pdf={tmp}", html.as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=timeout_s)
    if not tmp.is_file():
        raise RuntimeError(f"Chromium did not write {tmp}")
    os.replace(tmp, out)
    return out
