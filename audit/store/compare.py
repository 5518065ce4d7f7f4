"""The regression check between two recorded runs (``cxr-audit compare``): per (pathology,
method), the paired bootstrap of new - old on the image-finding units both runs scored, read from
the two run directories (`audit.store.rundir.read_run`). A regression is flagged only when the
95% CI of that paired difference lies wholly below zero; a CI that straddles zero is "not enough
evidence", never a regression. Without both run directories nothing is judged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from audit.metrics.aggregation import paired_run_difference
from audit.store.rundir import RunDirectoryError, read_run

#: The compared metrics: (name in the table, per-box column, per_pathology column).
COMPARED = (("iou", "iou", "iou_mean"), ("pointing", "pointing_hit", "pointing_rate"))
REGRESSION = "regression"
IMPROVEMENT = "improvement"
NO_CHANGE = "no change"
NOT_ENOUGH = "not enough evidence"
KEYS = ["pathology", "method"]


def evidence(lo: float, hi: float) -> str:
    """What a paired difference's 95% CI [lo, hi] of new - old says."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "cannot judge (no box scored in both runs)"
    if hi < 0:
        return REGRESSION
    if lo > 0:
        return IMPROVEMENT
    if lo == hi == 0:
        return NO_CHANGE
    return NOT_ENOUGH


def run_boxes(run_dir: str | Path | None) -> tuple[pd.DataFrame | None, str]:
    """(the ``boxes`` table of a run directory, "") or (None, why not: "run directory missing",
    "not a finished run directory" or "no box table")."""
    if not run_dir or not Path(run_dir).is_dir():
        return None, "run directory missing"
    try:
        boxes = read_run(Path(run_dir)).boxes
    except RunDirectoryError:
        return None, "not a finished run directory"
    if boxes is None or boxes.empty:
        return None, "no box table"
    return boxes, ""


def compare_runs(old: pd.DataFrame, new: pd.DataFrame, old_boxes: pd.DataFrame | None,
                 new_boxes: pd.DataFrame | None, seed: int = 0, n_boot: int = 2000,
                 cannot: str = "run directory missing") -> pd.DataFrame:
    """Per (pathology, method) of either run's aggregates ``old`` / ``new`` (per_pathology rows):
    ``n_pairs``, then per compared metric ``M`` in (iou, pointing): ``M_old, M_new`` (means over
    the paired units; the recorded aggregates when there are no box tables), ``M_diff,
    M_diff_lo, M_diff_hi`` (new - old, paired bootstrap 95% CI) and ``M_evidence``
    (regression | improvement | no change | not enough evidence | cannot judge (...)); then
    ``verdict_old, verdict_new, regression`` (some metric's CI wholly below 0) and ``why``.
    Without a box table (``None``) every row "cannot judge (``cannot``)"."""
    merged = old[KEYS + _present(old)].merge(new[KEYS + _present(new)], on=KEYS, how="outer",
                                             suffixes=("_old", "_new"), indicator=True)
    out = merged[KEYS].copy()
    both = (merged["_merge"] == "both").to_numpy()
    where = np.where(merged["_merge"] == "left_only", "cannot judge (only in the old run)",
                     "cannot judge (only in the new run)")
    judged = old_boxes is not None and new_boxes is not None
    out["n_pairs"] = 0
    for name, column, aggregate in COMPARED:
        if judged:
            table = paired_run_difference(old_boxes, new_boxes, column, by=KEYS, seed=seed,
                                          n_boot=n_boot)
            table = out[KEYS].merge(table.astype({k: str for k in KEYS}), on=KEYS, how="left")
            out["n_pairs"] = np.maximum(out["n_pairs"], table["n_pairs"].fillna(0).astype(int))
            values = {"old": table["mean_old"], "new": table["mean_new"],
                      "diff": table["mean_diff"], "diff_lo": table["diff_lo"],
                      "diff_hi": table["diff_hi"]}
            said = [evidence(lo, hi) for lo, hi in zip(values["diff_lo"], values["diff_hi"],
                                                       strict=True)]
        else:
            values = {"old": merged.get(f"{aggregate}_old"), "new": merged.get(f"{aggregate}_new"),
                      "diff": np.nan, "diff_lo": np.nan, "diff_hi": np.nan}
            said = [f"cannot judge ({cannot})"] * len(out)
        for suffix, v in values.items():
            out[f"{name}_{suffix}"] = np.nan if v is None else v
        out[f"{name}_evidence"] = np.where(both, said, where)
    for side in ("old", "new"):
        col = merged.get(f"verdict_{side}")
        out[f"verdict_{side}"] = col.fillna("").astype(str) if col is not None else ""
    flags = [[name for name, _, _ in COMPARED if out.at[i, f"{name}_evidence"] == REGRESSION]
             for i in out.index]
    out["regression"] = [bool(f) for f in flags]
    out["why"] = ["; ".join(f"{name}: 95% CI of the paired difference new - old wholly below 0"
                            for name in f) for f in flags]
    return out.sort_values(KEYS).reset_index(drop=True)


def _present(df: pd.DataFrame) -> list[str]:
    return [c for c in ("iou_mean", "pointing_rate", "verdict") if c in df.columns]
