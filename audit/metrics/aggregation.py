"""Aggregation per (pathology, method) with confidence intervals, paired method comparisons,
and acceptance criteria (PASS/FAIL).

* ``wilson_interval``: Wilson score interval of a proportion (as statsmodels
  ``proportion_confint(method="wilson")``).
* ``bootstrap_ci``: percentile bootstrap with a seeded ``numpy.random.Generator``; the
  resamples are ``rng.integers(0, n, (n_boot, n))`` and the quantiles use linear
  interpolation -- the same draws and quantiles as ``scipy.stats.bootstrap(...,
  method="percentile", rng=np.random.default_rng(seed))`` with ``n_resamples = n_boot``.
* ``collapse_boxes``: an image with several boxes of one finding counts once (best match:
  ``iou``, ``iobb``, ``coverage`` = max over its boxes, hits = any box, pointing = any box).
* ``aggregate_per_pathology``: the ``per_pathology`` table of docs/interfaces.md.
* ``paired_difference``: paired bootstrap of ``metric(method_a) - metric(method_b)``.
* ``evaluate_criteria``: ``verdict`` and ``criteria`` columns.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from scipy.stats import norm

from audit.protocol import HIT_THRESHOLDS, method_kind

__all__ = [
    "wilson_interval",
    "bootstrap_ci",
    "bootstrap_distribution",
    "collapse_boxes",
    "aggregate_per_pathology",
    "paired_difference",
    "ci_columns",
    "evaluate_criteria",
]



def wilson_interval(k: int, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials; ``(nan, nan)`` when n = 0."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (float("nan"), float("nan"))
    z = float(norm.ppf(1 - (1 - conf) / 2))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact bounds at the extremes
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (float(lo), float(hi))


def _vectorized(stat: Callable) -> Callable[[np.ndarray], np.ndarray]:
    def apply(samples: np.ndarray) -> np.ndarray:
        try:
            out = np.asarray(stat(samples, axis=-1), dtype=np.float64)
            if out.shape == samples.shape[:-1]:
                return out
        except TypeError:
            pass
        return np.array([stat(row) for row in samples], dtype=np.float64)

    return apply


def bootstrap_distribution(
    values, stat: Callable = np.mean, n_boot: int = 2000, seed: int = 0
) -> np.ndarray:
    """``n_boot`` values of ``stat`` over resamples (with replacement) of ``values``."""
    v = np.asarray(values, dtype=np.float64).ravel()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, (n_boot, v.size))
    return _vectorized(stat)(v[idx])


def bootstrap_ci(
    values,
    stat: Callable = np.mean,
    n_boot: int = 2000,
    seed: int = 0,
    conf: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat(values)``. NaNs are dropped first; ``(nan, nan)`` for
    no values; a single value gives ``(v, v)``."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return (float("nan"), float("nan"))
    dist = bootstrap_distribution(v, stat, n_boot, seed)
    alpha = (1 - conf) / 2
    lo, hi = np.quantile(dist, [alpha, 1 - alpha], method="linear")
    return (float(lo), float(hi))


def _hit_cols(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if re.fullmatch(r"(iou|iobb)_hit_[0-9.]+", str(c))]


def collapse_boxes(
    boxes_df: pd.DataFrame,
    keys: Sequence[str] = ("image_key", "finding", "method"),
) -> pd.DataFrame:
    """One row per ``keys`` group (an image's finding for a method): ``iou``, ``iobb`` and
    ``coverage`` are the max over the group's boxes, hit columns and ``pointing_hit`` are "any",
    ``n_boxes`` counts the boxes; other columns come from the best-IoU row (ties: larger IoBB,
    lower ``box_index``). Groups of one row are unchanged (plus ``n_boxes``). All ``keys`` must
    be columns (``KeyError`` otherwise)."""
    keys = list(keys)
    missing = [k for k in keys if k not in boxes_df.columns]
    if missing:
        raise KeyError(f"collapse_boxes needs columns {missing}")
    if boxes_df.empty:
        out = boxes_df.copy()
        out["n_boxes"] = pd.Series(dtype=int)
        return out
    sort_cols = ["iou"] + (["iobb"] if "iobb" in boxes_df else [])
    asc = [False] * len(sort_cols)
    if "box_index" in boxes_df:
        sort_cols.append("box_index")
        asc.append(True)
    ordered = boxes_df.sort_values(sort_cols, ascending=asc, kind="stable")
    g = ordered.groupby(keys, sort=False, dropna=False)
    best = g.head(1).set_index(keys)
    agg = {c: "max" for c in ("iou", "iobb", "coverage") if c in boxes_df}
    for c in _hit_cols(boxes_df) + (["pointing_hit"] if "pointing_hit" in boxes_df else []):
        agg[c] = "any"
    red = g.agg(agg)
    red["n_boxes"] = g.size()
    for c in red.columns:
        best[c] = red[c]
    return best.reset_index()


def aggregate_per_pathology(
    boxes_df: pd.DataFrame,
    by: Sequence[str] = ("pathology", "method"),
    seed: int = 0,
    n_boot: int = 2000,
    conf: float = 0.95,
    hit_thresholds: Iterable[float] = HIT_THRESHOLDS,
    include_overall: bool = False,
) -> pd.DataFrame:
    """The ``per_pathology`` table: one row per ``by`` group.

    ``boxes_df`` follows the ``boxes`` table (``finding`` is used as ``pathology`` when there is
    no ``pathology`` column). Boxes are first collapsed to one row per (image_key, pathology,
    method) (``collapse_boxes``), so ``n`` counts image-finding pairs (without an ``image_key``
    column every row counts). Columns:
    ``pathology, method, kind, n, iou_mean, iou_mean_lo, iou_mean_hi, iou_median,
    iou_median_lo, iou_median_hi, iobb_mean, coverage_mean, pointing_rate, pointing_lo,
    pointing_hi``,
    for each T: ``iou_hit_T_rate, iou_hit_T_lo, iou_hit_T_hi`` and the same for ``iobb_hit``,
    then ``verdict`` ("") and ``criteria`` (""). Means/medians: percentile bootstrap (``n_boot``
    resamples, ``seed`` for every group, so a group's CI does not depend on the others);
    rates: Wilson. ``include_overall`` adds rows with pathology "All" per method.
    """
    df = boxes_df.copy()
    if "pathology" not in df.columns:
        df["pathology"] = df["finding"]
    if "image_key" in df.columns:
        df = collapse_boxes(df, keys=["image_key", "pathology", "method"])
    else:  # no image identity: every row is its own unit
        df["n_boxes"] = 1
    if include_overall:
        allrows = df.copy()
        allrows["pathology"] = "All"
        df = pd.concat([df, allrows], ignore_index=True)
    by = list(by)
    thresholds = list(hit_thresholds)
    rows = []
    for group, sub in df.groupby(by, sort=True, dropna=False):
        group = group if isinstance(group, tuple) else (group,)
        row = dict(zip(by, group, strict=True))
        method = row.get("method", "")
        if "kind" in sub.columns and sub["kind"].notna().any():
            row["kind"] = str(sub["kind"].dropna().iloc[0])
        else:
            row["kind"] = method_kind(str(method))
        iou = sub["iou"].to_numpy(dtype=np.float64)
        n = int(iou.size)
        row["n"] = n
        row["iou_mean"] = float(np.mean(iou)) if n else np.nan
        row["iou_mean_lo"], row["iou_mean_hi"] = bootstrap_ci(iou, np.mean, n_boot, seed, conf)
        row["iou_median"] = float(np.median(iou)) if n else np.nan
        row["iou_median_lo"], row["iou_median_hi"] = bootstrap_ci(
            iou, np.median, n_boot, seed, conf
        )
        for col in ("iobb", "coverage"):
            row[f"{col}_mean"] = float(sub[col].mean()) if col in sub and n else np.nan
        if "pointing_hit" in sub:
            k = int(sub["pointing_hit"].astype(bool).sum())
            row["pointing_rate"] = k / n if n else np.nan
            row["pointing_lo"], row["pointing_hi"] = wilson_interval(k, n, conf)
        for fam in ("iou", "iobb"):
            for t in thresholds:
                col = f"{fam}_hit_{t:g}"
                if col not in sub:
                    continue
                k = int(sub[col].astype(bool).sum())
                row[f"{col}_rate"] = k / n if n else np.nan
                row[f"{col}_lo"], row[f"{col}_hi"] = wilson_interval(k, n, conf)
        row["verdict"] = ""
        row["criteria"] = ""
        rows.append(row)
    out = pd.DataFrame(rows)
    lead = by + ["kind", "n"]
    return out[lead + [c for c in out.columns if c not in lead]]


def paired_difference(
    boxes_df: pd.DataFrame,
    method_a: str,
    method_b: str,
    metric: str = "iou",
    seed: int = 0,
    n_boot: int = 2000,
    conf: float = 0.95,
    keys: Sequence[str] = ("image_key", "finding", "box_index"),
    by: str | None = None,
    best_match: bool = False,
) -> pd.DataFrame:
    """Paired bootstrap of ``mean(metric_a - metric_b)`` over the units both methods scored.

    Units are paired on ``keys`` (default one expert box: image_key + finding + box_index).
    ``best_match=True`` first collapses boxes per (image_key, finding, method) as
    ``aggregate_per_pathology`` does and pairs on (image_key, finding). Resampling draws units
    (pairs) with replacement. ``by`` (e.g. "finding") gives one row per group; otherwise a
    single row. Columns: [by], ``method_a, method_b, metric, n_pairs, mean_a, mean_b,
    mean_diff, diff_lo, diff_hi, p_boot`` (two-sided: 2 x the smaller share of bootstrap
    differences on either side of 0, capped at 1).
    """
    df = boxes_df
    keys = list(keys)
    if best_match:
        df = collapse_boxes(df, keys=["image_key", "finding", "method"])
        keys = [k for k in keys if k != "box_index"]
    group_keys = keys + ([by] if by and by not in keys else [])
    a = df[df["method"] == method_a].set_index(group_keys)[metric].astype(float)
    b = df[df["method"] == method_b].set_index(group_keys)[metric].astype(float)
    if not a.index.is_unique or not b.index.is_unique:
        raise ValueError(f"keys {keys} do not identify one row per method")
    joined = pd.concat({"a": a, "b": b}, axis=1, join="inner").dropna().reset_index()
    groups = [(None, joined)] if by is None else list(joined.groupby(by, sort=True))
    rows = []
    for g, sub in groups:
        d = (sub["a"] - sub["b"]).to_numpy()
        row = {} if by is None else {by: g}
        row.update(method_a=method_a, method_b=method_b, metric=metric, n_pairs=int(d.size))
        row["mean_a"] = float(sub["a"].mean()) if d.size else np.nan
        row["mean_b"] = float(sub["b"].mean()) if d.size else np.nan
        row["mean_diff"] = float(d.mean()) if d.size else np.nan
        if d.size:
            dist = bootstrap_distribution(d, np.mean, n_boot, seed)
            alpha = (1 - conf) / 2
            lo, hi = np.quantile(dist, [alpha, 1 - alpha])
            p = 2 * min(np.mean(dist <= 0), np.mean(dist >= 0))
            row.update(diff_lo=float(lo), diff_hi=float(hi), p_boot=float(min(1.0, p)))
        else:
            row.update(diff_lo=np.nan, diff_hi=np.nan, p_boot=np.nan)
        rows.append(row)
    return pd.DataFrame(rows)


_OPS = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}


def ci_columns(metric: str) -> tuple[str, str]:
    """The (lower, upper) CI column names of a ``per_pathology`` metric column.

    ``pointing_rate -> (pointing_lo, pointing_hi)``; ``iou_hit_0.5_rate ->
    (iou_hit_0.5_lo, iou_hit_0.5_hi)``; ``iou_mean -> (iou_mean_lo, iou_mean_hi)``.
    """
    if metric.endswith("_rate"):
        stem = metric[: -len("_rate")]
        return f"{stem}_lo", f"{stem}_hi"
    return f"{metric}_lo", f"{metric}_hi"


def _criterion_text(c: dict) -> str:
    use = c.get("use", "estimate")
    return f"{c['metric']} {c['op']} {c['value']:g} ({use})"


def evaluate_criteria(per_pathology_df: pd.DataFrame, criteria: Sequence[dict]) -> pd.DataFrame:
    """Add ``verdict`` ("PASS" | "FAIL" | "") and ``criteria`` (text) to a per_pathology table.

    A criterion is ``{"pathology": name | "*", "method": name | "*", "metric": column,
    "op": ">=" | ">" | "<=" | "<" | "==" | "!=", "value": float, "use": "estimate" | "ci_low" |
    "ci_high"}`` (``use`` defaults to "estimate": the metric column itself; "ci_low"/"ci_high"
    compare the CI bound, see ``ci_columns``). A "*" method matches rows of kind "method" only
    (baselines are judged only by criteria that name them). A row passes when every criterion
    that applies to it holds; a missing or NaN value fails. ``criteria`` text lists each applied
    criterion with the observed value and its outcome, joined by "; ".
    """
    out = per_pathology_df.copy()
    verdicts, texts = [], []
    for _, row in out.iterrows():
        applied = []
        for c in criteria:
            p, m = c.get("pathology", "*"), c.get("method", "*")
            if p != "*" and p != row.get("pathology"):
                continue
            if m == "*":
                if row.get("kind", "method") != "method":
                    continue
            elif m != row.get("method"):
                continue
            if c["op"] not in _OPS:
                raise ValueError(f"unknown op {c['op']!r}")
            use = c.get("use", "estimate")
            if use == "estimate":
                col = c["metric"]
            elif use == "ci_low":
                col = ci_columns(c["metric"])[0]
            elif use == "ci_high":
                col = ci_columns(c["metric"])[1]
            else:
                raise ValueError(f"unknown use {use!r}")
            val = row.get(col, np.nan)
            val = float(val) if val is not None and not pd.isna(val) else float("nan")
            ok = bool(np.isfinite(val) and _OPS[c["op"]](val, float(c["value"])))
            applied.append((ok, f"{_criterion_text(c)}: {val:.4g} {'PASS' if ok else 'FAIL'}"))
        if not applied:
            verdicts.append("")
            texts.append("")
        else:
            verdicts.append("PASS" if all(a for a, _ in applied) else "FAIL")
            texts.append("; ".join(t for _, t in applied))
    out["verdict"] = verdicts
    out["criteria"] = texts
    return out
