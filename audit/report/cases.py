"""Which cases a gallery shows: per pathology and method, ranked by the metric the verdict reads.

The ranking metric is the first acceptance criterion's (`ranking_metric`; the default criteria
judge the pointing game). One unit per image and finding, as the verdicts count them (several
boxes of one finding: the pointing game is a hit when any box is hit, and the distance is the
nearest box's; IoU and IoBB are the best box's); the row shown is the best-matching box.

Per group the cases are, best first: ``best hit``, ``typical hit`` (the lower median of the
hits), ``median`` (the lower median of all units), ``typical miss`` (the lower median of the
misses) and ``worst miss``; a unit that is two cases is shown once, under the name that comes
first in `CASE_PRIORITY` (the median case is always shown). The assembly keeps the maps of
exactly these cases.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from audit.protocol import BASELINE_NAMES, DEFAULT_CRITERIA

CASES: tuple[str, ...] = ("best hit", "typical hit", "median", "typical miss", "worst miss")
#: Which name a row that is two cases keeps.
CASE_PRIORITY: tuple[str, ...] = ("median", "best hit", "worst miss", "typical hit",
                                  "typical miss")
#: Ranking metrics: the per-box column and whether a larger value is better.
RANK_COLUMNS: dict[str, str] = {"pointing": "pointing_hit", "iou": "iou", "iobb": "iobb",
                                "coverage": "coverage"}
#: Hit threshold of an overlap metric when its criterion names no value.
DEFAULT_OVERLAP_HIT = 0.25


def ranking_metric(criteria: list[dict[str, Any]] | None) -> tuple[str, float]:
    """``(metric family, hit threshold)`` of the first criterion (default criteria when none):
    ``pointing`` (a hit is a pointing-game hit) or ``iou`` / ``iobb`` / ``coverage`` (a hit is a
    value at or above the criterion's threshold: ``iou_hit_0.5_rate`` -> 0.5)."""
    first = (criteria or list(DEFAULT_CRITERIA))[0]
    metric = str(first.get("metric", "pointing_rate"))
    family = metric.split("_", 1)[0]
    if family not in RANK_COLUMNS or family == "pointing":
        return "pointing", 1.0
    parts = metric.split("_")
    if len(parts) >= 3 and parts[1] == "hit":
        return family, float(parts[2])
    value = first.get("value")
    return family, float(value) if isinstance(value, (int, float)) else DEFAULT_OVERLAP_HIT


def _units(boxes: pd.DataFrame, group: list[str]) -> pd.DataFrame:
    """One row per (group, image_key): the best-matching box, with unit-level scores."""
    keys = [*group, "image_key"]
    df = boxes.assign(_hit=boxes["pointing_hit"].astype(str).str.lower().isin(("true", "1",
                                                                              "1.0")),
                      _dist=pd.to_numeric(boxes.get("pointing_distance", np.nan),
                                          errors="coerce"))
    per_unit = df.groupby(keys, sort=False, dropna=False).agg(
        _hit=("_hit", "max"), _dist=("_dist", "min")).reset_index()
    best_match = df["best_match"] if "best_match" in df else pd.Series(True, index=df.index)
    best = df[best_match.fillna(False).astype(bool)].drop(columns=["_hit", "_dist"])
    best = best.drop_duplicates(keys)
    return best.merge(per_unit, on=keys, how="left")


def rank_units(boxes: pd.DataFrame, metric: str, hit_at: float,
               group: tuple[str, ...] = ("pathology", "method")) -> pd.DataFrame:
    """Units sorted best first within each group, with ``_is_hit`` and ``_rank`` columns."""
    g = list(group)
    df = _units(boxes, g)
    iou = pd.to_numeric(df["iou"], errors="coerce").fillna(-1.0)
    if metric == "pointing":
        df["_is_hit"] = df["_hit"].astype(bool)
        # hits first; then nearer maxima; then the overlap of the box shown
        df["_s1"], df["_s2"] = df["_is_hit"].astype(float), -df["_dist"].fillna(np.inf)
    else:
        value = pd.to_numeric(df[RANK_COLUMNS[metric]], errors="coerce").fillna(-1.0)
        df["_is_hit"] = value >= hit_at
        df["_s1"], df["_s2"] = value, df["_hit"].astype(float)
    df["_s3"] = iou
    df["_key"] = df["image_key"].astype(str)
    df = df.sort_values([*g, "_s1", "_s2", "_s3", "_key"],
                        ascending=[True] * len(g) + [False, False, False, True],
                        kind="mergesort")
    df["_rank"] = df.groupby(g, sort=False).cumcount()
    return df


def _pick(sub: pd.DataFrame) -> list[tuple[str, int]]:
    """(case, row position) per case of one group, best first, each row once: a row that is
    two cases keeps the first name of `CASE_PRIORITY` (the median case is always shown)."""
    hits = np.flatnonzero(sub["_is_hit"].to_numpy())
    misses = np.flatnonzero(~sub["_is_hit"].to_numpy())
    n = len(sub)
    positions = {"best hit": hits[0] if len(hits) else None,
                 "typical hit": hits[(len(hits) - 1) // 2] if len(hits) else None,
                 "median": (n - 1) // 2 if n else None,
                 "typical miss": misses[(len(misses) - 1) // 2] if len(misses) else None,
                 "worst miss": misses[-1] if len(misses) else None}
    named: dict[int, str] = {}
    for case in CASE_PRIORITY:
        pos = positions[case]
        if pos is not None:
            named.setdefault(int(pos), case)
    return [(case, pos) for pos, case in sorted(named.items())]


def select_cases(boxes: pd.DataFrame | None, metric: str = "pointing", hit_at: float = 1.0,
                 group: tuple[str, ...] = ("pathology", "method"),
                 methods_only: bool = True) -> pd.DataFrame:
    """The gallery's cases (`CASES`) per group, with ``case``, ``is_hit`` and ``n_hits`` /
    ``n_units`` of the group; baselines are left out unless ``methods_only`` is False."""
    if boxes is None or boxes.empty:
        return pd.DataFrame(columns=["case", "is_hit", "n_hits", "n_units"])
    if methods_only:
        boxes = boxes[~boxes["method"].astype(str).isin(BASELINE_NAMES)]
        if boxes.empty:
            return pd.DataFrame(columns=["case", "is_hit", "n_hits", "n_units"])
    ranked = rank_units(boxes, metric, hit_at, group)
    chosen = []
    for _, sub in ranked.groupby(list(group), sort=False, dropna=False):
        sub = sub.reset_index(drop=True)
        for case, pos in _pick(sub):
            row = sub.iloc[pos].to_dict()
            row.update(case=case, is_hit=bool(row["_is_hit"]), n_hits=int(sub["_is_hit"].sum()),
                       n_units=len(sub))
            chosen.append(row)
    out = pd.DataFrame(chosen)
    return out.drop(columns=[c for c in out.columns if c.startswith("_")])


def shown_maps(boxes: pd.DataFrame | None, criteria: list[dict[str, Any]] | None
               ) -> set[tuple[str, str, str]]:
    """``(method, image_key, model finding)`` of every case the report's galleries show."""
    metric, hit_at = ranking_metric(criteria)
    cases = select_cases(boxes, metric, hit_at)
    if cases.empty:
        return set()
    return {(str(m), str(k), str(f)) for m, k, f in
            cases[["method", "image_key", "model_finding"]].itertuples(index=False)}
