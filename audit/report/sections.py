"""The run-wide sections of the report, each built from the run's tables: repeatability,
randomization, fidelity (deletion / insertion), Integrated Gradients' completeness, rejects and
the change since a previous run. Each returns None (or nothing) when the run did not record it.
"""

from __future__ import annotations

import math
import operator
from pathlib import Path
from typing import Any

import pandas as pd

from audit.store.files import float_or_nan
from audit.store.rundir import RunData, read_run

from . import plots as _plots
from .format import (
    ILLUSTRATIVE_BELOW,
    arrow,
    as_text,
    generic_table,
    method_label,
    method_labels,
    num_cell,
    timestamp,
)
from .gallery import COMPLETENESS_FLAG
from .provenance import sub

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
FIDELITY_FAMILIES = ("deletion", "insertion", "deletion_random", "insertion_random")
#: A method beats its random-order curve with a lower deletion AUC / a higher insertion AUC.
BEATS_RANDOM = {"deletion": operator.lt, "insertion": operator.gt}


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


def _n_images(df: pd.DataFrame | None, cols: list[str] | None = None) -> int:
    """Distinct images with a number in any of ``cols`` (every row when ``cols`` is None)."""
    if df is None or df.empty or "image_key" not in df:
        return 0
    if cols is not None:
        df = df[df[cols].apply(pd.to_numeric, errors="coerce").notna().any(axis=1)]
    return int(df["image_key"].astype(str).nunique())


def _sample(n: int) -> dict:
    return {"n_images": n, "illustrative": n < ILLUSTRATIVE_BELOW}


def _any_number(df: pd.DataFrame, cols: list[str]) -> bool:
    return bool(cols) and bool(df[cols].apply(pd.to_numeric, errors="coerce").notna().any().any())


def repeatability_section(images: pd.DataFrame | None, methods: list[str]) -> dict | None:
    if images is None or images.empty:
        return None
    cols = [c for c in REPEAT_HEADERS if c in images.columns]
    if not _any_number(images, cols):
        return None
    absc = ("shift_delta_iou",)
    by_path = _mean_table(images, ["finding", "method"], cols, absc)
    return {
        **_sample(_n_images(images, cols)),
        "cols": cols,
        "by_method": _sort_by_method(_mean_table(images, ["method"], cols, absc), methods),
        "by_pathology": _sort_by_method(by_path, methods),
        "plot": _plots.repeatability_svg(images, methods, method_labels(methods)),
    }


def randomization_section(curves: pd.DataFrame | None, images: pd.DataFrame | None,
                          methods: list[str]) -> dict | None:
    """The cascading randomization curves (``family == "randomization_cascade"``) and the
    images table's final |Spearman|."""
    casc = None
    if curves is not None and not curves.empty:
        casc = curves[curves["family"] == "randomization_cascade"]
    has_img = images is not None and "randomization_final_spearman_abs" in images.columns \
        and images["randomization_final_spearman_abs"].notna().any()
    if (casc is None or casc.empty) and not has_img:
        return None
    out = {"cascade_plot": None, "final": [], "metrics": [], "steps": [], "per_image": [],
           **_sample(_n_images(casc) if casc is not None and not casc.empty else
                     _n_images(images, ["randomization_final_spearman_abs"]))}
    if casc is not None and not casc.empty:
        out["cascade_plot"] = _plots.randomization_cascade_plot(casc, methods,
                                                                method_labels(methods))
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
        out["steps"] = [{"step": int(s.step), "label": as_text(s.label),
                         "x": num_cell(s.x)} for s in steps.itertuples()]
    if has_img:
        rows = _mean_table(images, ["method"], ["randomization_final_spearman_abs"])
        out["per_image"] = _sort_by_method(rows, methods)
    return out


def _beats_random(g: pd.DataFrame) -> dict:
    """Fraction of images where a method's AUC beats its random-order curve's."""
    beats = {}
    for family, better in BEATS_RANDOM.items():
        pair = [f"fidelity_{family}_auc", f"fidelity_{family}_auc_random"]
        if set(pair) <= set(g.columns):
            d = g[pair].dropna()
            beats[family] = num_cell(better(d.iloc[:, 0], d.iloc[:, 1]).mean()
                                     if len(d) else math.nan)
    return beats


def fidelity_section(curves: pd.DataFrame | None, images: pd.DataFrame | None,
                     methods: list[str]) -> dict | None:
    c = None
    if curves is not None and not curves.empty:
        c = curves[curves["family"].isin(FIDELITY_FAMILIES)]
    cols = [k for k in FIDELITY_HEADERS if images is not None and k in images.columns]
    has_img = _any_number(images, cols)
    if (c is None or c.empty) and not has_img:
        return None
    rows = []
    by_path = []
    if has_img:
        rows = _sort_by_method(_mean_table(images, ["method"], cols), methods)
        by_path = _sort_by_method(_mean_table(images, ["finding", "method"], cols), methods)
        for r in rows:
            r["beats"] = _beats_random(images[images["method"].astype(str) == r["method"]])
    plot = _plots.fidelity_plot(c, methods, method_labels(methods)) if c is not None and not \
        c.empty else None
    n = _n_images(images, cols) if has_img else _n_images(c)
    return {"cols": cols, "by_method": rows, "by_pathology": by_path, "plot": plot,
            **_sample(n)}


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
                    "rel": num_cell(rel), "flag": math.isfinite(rel) and rel > COMPLETENESS_FLAG})
    return out


def rejects_section(rejects: pd.DataFrame | None, limit: int = 2000) -> dict | None:
    if rejects is None:
        return None
    cols = [c for c in ("path", "image_key", "finding", "reason") if c in rejects.columns]
    rows = [[as_text(v) for v in r] for r in rejects[cols].head(limit).itertuples(index=False)]
    return {"cols": cols, "rows": rows, "n": len(rejects), "truncated": len(rejects) > limit}


def _ci_overlap(a_lo, a_hi, b_lo, b_hi) -> bool | None:
    vals = [float_or_nan(v) for v in (a_lo, a_hi, b_lo, b_hi)]
    if not all(math.isfinite(v) for v in vals):
        return None
    return not (vals[1] < vals[2] or vals[3] < vals[0])


CHANGE_METRICS = (
    ("pointing_rate", "pointing_lo", "pointing_hi", "pointing hit rate"),
    ("iou_mean", "iou_mean_lo", "iou_mean_hi", "mean IoU"),
)


def _change_rows(prev: pd.DataFrame, cur: pd.DataFrame, methods: list[str]) -> list[dict]:
    """Pointing rate and mean IoU per (pathology, method) of both runs, with the change."""
    prev_rows = {(str(r["pathology"]), str(r["method"])): r for r in prev.to_dict("records")}
    rows = []
    for r in cur.to_dict("records"):
        key = (str(r["pathology"]), str(r["method"]))
        p = prev_rows.get(key)
        if p is None:
            continue
        for metric, lo, hi, name in CHANGE_METRICS:
            d = float_or_nan(r.get(metric)) - float_or_nan(p.get(metric))
            sign, cls = arrow(d)
            rows.append({
                "pathology": key[0], "method": key[1], "label": method_label(key[1]),
                "metric": name,
                "prev": num_cell(p.get(metric)), "prev_lo": num_cell(p.get(lo)),
                "prev_hi": num_cell(p.get(hi)),
                "cur": num_cell(r.get(metric)), "cur_lo": num_cell(r.get(lo)),
                "cur_hi": num_cell(r.get(hi)),
                "delta": num_cell(d), "arrow": sign, "cls": cls,
                "overlap": _ci_overlap(p.get(lo), p.get(hi), r.get(lo), r.get(hi)),
                "prev_verdict": as_text(p.get("verdict")), "cur_verdict": as_text(r.get("verdict")),
            })
    order = {m: i for i, m in enumerate(methods)}
    rows.sort(key=lambda x: (x["pathology"], order.get(x["method"], 99)))
    return rows


def change_section(current: RunData, previous_run_dir: Path | None,
                   comparison: pd.DataFrame | None, methods: list[str]) -> dict | None:
    if previous_run_dir is None and comparison is None:
        return None
    out: dict[str, Any] = {"rows": [], "warnings": [], "previous": None, "comparison": None}
    if previous_run_dir is not None:
        prev = read_run(Path(previous_run_dir))
        pm, cm = sub(prev.run, "model"), sub(current.run, "model")
        pd_, cd = sub(prev.run, "dataset"), sub(current.run, "dataset")
        out["previous"] = {
            "run_id": prev.run_id, "finished_at": timestamp(prev.run.get("finished_at")),
            "model": as_text(pm.get("name")), "fingerprint": as_text(pm.get("fingerprint")),
            "dataset": as_text(pd_.get("name")),
            "manifest_sha256": as_text(pd_.get("manifest_sha256")),
        }
        if as_text(pm.get("name")) != as_text(cm.get("name")):
            out["warnings"].append("The previous run used another model name.")
        if as_text(pd_.get("manifest_sha256")) != as_text(cd.get("manifest_sha256")):
            out["warnings"].append("The previous run used another dataset manifest "
                                   "(different manifest sha256).")
        fingerprint = as_text(pm.get("fingerprint"))
        if fingerprint and fingerprint == as_text(cm.get("fingerprint")):
            out["warnings"].append("Same weights fingerprint as the previous run.")
        a, b = prev.per_pathology, current.per_pathology
        if a is not None and b is not None and not a.empty and not b.empty:
            out["rows"] = _change_rows(a, b, methods)
    if comparison is not None:
        out["comparison"] = generic_table(comparison, arrows=True)
    return out
