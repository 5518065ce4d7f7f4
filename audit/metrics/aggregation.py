"""Aggregation per (pathology, method) with confidence intervals and paired comparisons (between
methods of one run, and between two runs). Acceptance criteria live in ``criteria``.

* ``wilson_interval``: Wilson score interval of a proportion (as statsmodels
  ``proportion_confint(method="wilson")``); ``wilson_bounds`` the same at any observed rate.
* ``bootstrap_ci``: percentile bootstrap with a seeded ``numpy.random.Generator``; the
  resamples are ``rng.integers(0, n, (n_boot, n))`` and the quantiles use linear
  interpolation -- the same draws and quantiles as ``scipy.stats.bootstrap(...,
  method="percentile", rng=np.random.default_rng(seed))`` with ``n_resamples = n_boot``.
* ``collapse_boxes``: an image with several boxes of one finding counts once (best match:
  ``iou``, ``iobb``, ``coverage`` = max over its boxes, hits = any box, pointing = any box).
* ``aggregate_per_pathology``: the ``per_pathology`` table of docs/interfaces.md.
* ``paired_difference``: paired bootstrap of ``metric(method_a) - metric(method_b)``.
* ``paired_run_difference``: paired bootstrap of ``metric(new run) - metric(old run)`` on the
  image-finding units both runs scored.
"""

from __future__ import annotations

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
    "paired_run_difference",
    "wilson_bounds",
]

def wilson_interval(k: int, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials; ``(nan, nan)`` when n = 0."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (float("nan"), float("nan"))
    return wilson_bounds(k / n, n, conf)


def wilson_bounds(rate: float, n: float, conf: float = 0.95) -> tuple[float, float]:
    """Wilson score interval at an observed ``rate`` in [0, 1] over ``n`` > 0 units (``rate * n``
    need not be an integer: "the interval these boxes would give at this rate"). The bounds are
    exactly 0 at rate 0 and 1 at rate 1."""
    z = float(norm.ppf(1 - (1 - conf) / 2))
    p = float(rate)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if p == 0 else max(0.0, centre - half)  # exact bounds at the extremes
    hi = 1.0 if p == 1 else min(1.0, centre + half)
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
    head = {"method_a": method_a, "method_b": method_b, "metric": metric}
    table = _paired_table(a, b, [by] if by else [], head, seed, n_boot, conf)
    return table.rename(columns={"mean_x": "mean_a", "mean_y": "mean_b"})


def paired_run_difference(
    old_boxes: pd.DataFrame,
    new_boxes: pd.DataFrame,
    metric: str = "iou",
    by: Sequence[str] = ("pathology", "method"),
    seed: int = 0,
    n_boot: int = 2000,
    conf: float = 0.95,
) -> pd.DataFrame:
    """Paired bootstrap of ``mean(metric_new - metric_old)`` between two runs' ``boxes`` tables.

    Each run's boxes are collapsed per (image_key, finding, method) as in the per-pathology
    aggregate (best match); units are paired on (image_key, finding, method), plus ``sha256``
    when both tables have it (the same image file), so only units both runs scored count.
    ``finding`` stands in for a missing ``pathology`` column. One row per ``by`` group:
    [by], ``metric, n_pairs, mean_old, mean_new, mean_diff, diff_lo, diff_hi, p_boot`` (as
    ``paired_difference``, with new - old)."""
    keys = ["image_key", "finding", "method"]
    if "sha256" in old_boxes and "sha256" in new_boxes:
        keys.append("sha256")
    by = list(by)
    series = []
    for boxes in (old_boxes, new_boxes):
        df = boxes if "pathology" in boxes else boxes.assign(pathology=boxes["finding"])
        df = collapse_boxes(df, keys=keys)
        series.append(df.set_index(keys + [c for c in by if c not in keys])[metric].astype(float))
    table = _paired_table(series[1], series[0], by, {"metric": metric}, seed, n_boot, conf)
    return table.rename(columns={"mean_x": "mean_new", "mean_y": "mean_old"})


def _paired_table(x: pd.Series, y: pd.Series, by: list[str], head: dict, seed: int,
                  n_boot: int, conf: float) -> pd.DataFrame:
    """Rows of the paired bootstrap of ``mean(x - y)`` over the index values both series hold
    (NaN pairs dropped), one per ``by`` group (one row when ``by`` is empty)."""
    joined = pd.concat({"x": x, "y": y}, axis=1, join="inner").dropna().reset_index()
    groups = [((), joined)] if not by else list(joined.groupby(by, sort=True))
    rows = []
    for g, sub in groups:
        d = (sub["x"] - sub["y"]).to_numpy()
        row = dict(zip(by, g if isinstance(g, tuple) else (g,), strict=True))
        row.update(head, n_pairs=int(d.size))
        row["mean_x"] = float(sub["x"].mean()) if d.size else np.nan
        row["mean_y"] = float(sub["y"].mean()) if d.size else np.nan
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
    columns = [*by, *head, "n_pairs", "mean_x", "mean_y", "mean_diff", "diff_lo", "diff_hi",
               "p_boot"]
    return pd.DataFrame(rows, columns=columns)
