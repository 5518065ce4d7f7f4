"""Acceptance criteria -> three-valued verdicts (docs/metrics.md "Acceptance criteria").

A criterion on a ``per_pathology`` metric with its 95% CI [lo, hi] is PASS when the whole CI
satisfies it, FAIL when no point of the CI does, INCONCLUSIVE otherwise; with ``use =
"estimate"`` only the point estimate is compared (PASS/FAIL, labelled "point estimate"). A
baseline criterion (``op = "beats"``) is judged on the paired difference method - baseline on
the same boxes (``paired.csv``): PASS when its CI lies above 0, FAIL when it lies at or below 0.
An INCONCLUSIVE verdict carries "n needed": the number of units (image-finding pairs) that would
make it decisive if the observed rate (or mean, or difference) held.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from audit.metrics.aggregation import wilson_bounds
from audit.protocol import (
    BASELINE_NAMES,
    BEATS,
    BOOTSTRAP_METRICS,
    CRITERION_OPS,
    CRITERION_USES,
    DEFAULT_CRITERION_USE,
    ESTIMATE_ONLY_METRICS,
    FAIL,
    INCONCLUSIVE,
    METHOD_LABELS,
    METHOD_NAMES,
    N_NEEDED_CAP,
    PAIRED_METRICS,
    PASS,
    RATE_METRICS,
)

__all__ = [
    "Judgement",
    "ci_columns",
    "check_criteria",
    "criterion_label",
    "interval_verdict",
    "n_needed_wilson",
    "n_needed_normal",
    "evaluate_criteria",
    "overall_verdict",
    "format_n_needed",
]

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt,
        "==": operator.eq, "!=": operator.ne}
_CI_OPS = (">=", ">", "<=", "<")
NOT_APPLICABLE = ""


@dataclass
class Judgement:
    """The outcome of one criterion on one row: ``verdict`` (PASS | FAIL | INCONCLUSIVE, or ""
    when it does not apply), the text shown for it, and for an INCONCLUSIVE verdict ``n_needed``
    (``inf``: never within N_NEEDED_CAP; NaN otherwise) and whether that is an approximation."""

    verdict: str
    text: str
    n_needed: float = math.nan
    approx: bool = False


def ci_columns(metric: str) -> tuple[str, str]:
    """The (lower, upper) CI column names of a ``per_pathology`` metric column.

    ``pointing_rate -> (pointing_lo, pointing_hi)``; ``iou_hit_0.5_rate ->
    (iou_hit_0.5_lo, iou_hit_0.5_hi)``; ``iou_mean -> (iou_mean_lo, iou_mean_hi)``.
    """
    if metric.endswith("_rate"):
        stem = metric[: -len("_rate")]
        return f"{stem}_lo", f"{stem}_hi"
    return f"{metric}_lo", f"{metric}_hi"


# ---- validation and labels ------------------------------------------------------------------


def check_criteria(criteria: Sequence[Any]) -> list[dict[str, Any]]:
    """The criteria as dicts, checked (``ValueError`` with one line naming the first problem)."""
    if not isinstance(criteria, (list, tuple)):
        raise ValueError("acceptance must be a list of criteria (tables)")
    for i, c in enumerate(criteria):
        if not isinstance(c, dict):
            raise ValueError(f"acceptance criterion {i + 1} is not a table: {c!r}")
        where = f"acceptance criterion {i + 1} ({c.get('metric')} {c.get('op')})"
        known_methods = ("*", *METHOD_NAMES, *BASELINE_NAMES)
        if c.get("method", "*") not in known_methods:
            raise ValueError(f"{where}: unknown method {c.get('method')!r}; choose from "
                             f"{list(known_methods)}")
        if c.get("op") == BEATS:
            if c.get("baseline") not in BASELINE_NAMES:
                raise ValueError(f"{where}: baseline must be one of {list(BASELINE_NAMES)}")
            if c.get("metric") not in PAIRED_METRICS:
                raise ValueError(f"{where}: a baseline criterion compares a per-box metric, "
                                 f"one of {list(PAIRED_METRICS)}")
            continue
        if c.get("op") not in CRITERION_OPS:
            raise ValueError(f"{where}: op must be one of {[*CRITERION_OPS, BEATS]}")
        use = c.get("use", DEFAULT_CRITERION_USE)
        if use not in CRITERION_USES:
            raise ValueError(f"{where}: use must be one of {list(CRITERION_USES)}, got {use!r}")
        metrics = RATE_METRICS + BOOTSTRAP_METRICS + (
            ESTIMATE_ONLY_METRICS if use == "estimate" else ())
        if c.get("metric") not in metrics:
            raise ValueError(f"{where}: metric must be one of {list(metrics)} with use={use!r}")
        if use == "ci" and c["op"] not in _CI_OPS:
            raise ValueError(f"{where}: a CI criterion needs one of {list(_CI_OPS)}")
        value = c.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value):
            raise ValueError(f"{where}: value must be a finite number, got {value!r}")
    return [dict(c) for c in criteria]


def criterion_label(c: dict) -> str:
    """``pointing_rate >= 0.5 (95% CI)``, ``pointing_rate >= 0.5 (point estimate)`` or
    ``pointing_hit beats Centre prior (paired difference, 95% CI)``."""
    if c.get("op") == BEATS:
        base = METHOD_LABELS.get(str(c.get("baseline")), str(c.get("baseline")))
        return f"{c.get('metric')} beats {base} (paired difference, 95% CI)"
    use = CRITERION_USES.get(c.get("use", DEFAULT_CRITERION_USE), str(c.get("use")))
    value = c.get("value")
    value = f"{value:g}" if isinstance(value, (int, float)) else str(value)
    return f"{c.get('metric')} {c.get('op')} {value} ({use})"


def format_n_needed(n_needed: float, approx: bool = False) -> str:
    """``"123"``, ``"≈ 123"``, ``"never"`` (inf) or ``""`` (NaN: nothing to decide)."""
    if n_needed is None or (isinstance(n_needed, float) and math.isnan(n_needed)):
        return ""
    if math.isinf(n_needed):
        return "never"
    return f"{'≈ ' if approx else ''}{int(n_needed)}"


# ---- verdicts -------------------------------------------------------------------------------


def interval_verdict(lo: float, hi: float, op: str, value: float) -> str:
    """PASS when both ends of [lo, hi] satisfy ``op value`` (so the whole interval does, the ops
    being monotone), FAIL when neither does, INCONCLUSIVE otherwise or when a bound is NaN."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE
    at_lo, at_hi = _OPS[op](lo, value), _OPS[op](hi, value)
    if at_lo and at_hi:
        return PASS
    if not at_lo and not at_hi:
        return FAIL
    return INCONCLUSIVE


def n_needed_wilson(rate: float, n: int, op: str, value: float, conf: float = 0.95,
                    cap: int = N_NEEDED_CAP) -> float:
    """The smallest n' such that the Wilson CI at the observed ``rate`` over n' units
    (``wilson_bounds(rate, n')``) gives a decisive verdict (PASS or FAIL) for ``op value``;
    ``inf`` when no n' <= ``cap`` does (always the case when ``rate == value``, strictly inside
    (0, 1)). Decisiveness is monotone in n' (the Wilson interval is the inverted score test,
    so its bounds approach the rate as n' grows), so a bisection finds n'."""

    def decisive(m: int) -> bool:
        return interval_verdict(*wilson_bounds(rate, m, conf), op, value) != INCONCLUSIVE

    if decisive(1):
        return 1.0
    if not decisive(cap):
        return math.inf
    low, high = max(1, min(int(n), cap - 1)), cap  # decisive(low) is False when n is indecisive
    if decisive(low):
        low = 1
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if decisive(mid) else (mid, high)
    return float(high)


def n_needed_normal(estimate: float, lo: float, hi: float, n: int, value: float,
                    cap: int = N_NEEDED_CAP) -> float:
    """Approximate units needed for a bootstrap CI [lo, hi] of ``estimate`` (over ``n`` units)
    to exclude ``value`` if the estimate held: the half-width on the side facing ``value``
    shrinks as 1/sqrt(n), so n' = ceil(n * (half-width / |estimate - value|)^2) (at least n + 1);
    ``inf`` when the estimate equals ``value`` or n' exceeds ``cap``."""
    gap = estimate - value
    if not all(math.isfinite(v) for v in (estimate, lo, hi)) or gap == 0:
        return math.inf
    half = estimate - lo if gap > 0 else hi - estimate
    needed = max(int(n) + 1, math.ceil(n * (half / abs(gap)) ** 2))
    return float(needed) if needed <= cap else math.inf


def _num(row: dict, col: str) -> float:
    v = row.get(col)
    try:
        return float(v) if v is not None and not pd.isna(v) else math.nan
    except (TypeError, ValueError):
        return math.nan


def _judge_metric(c: dict, row: dict, conf: float) -> Judgement:
    metric, op, value = c["metric"], c["op"], float(c["value"])
    label = criterion_label(c)
    est, n = _num(row, metric), _num(row, "n")
    n_text = f"n = {int(n)}" if math.isfinite(n) else "n = ?"
    if not math.isfinite(est):
        return Judgement(INCONCLUSIVE, f"{label}: no value in this run → {INCONCLUSIVE}")
    if c.get("use", DEFAULT_CRITERION_USE) == "estimate":
        verdict = PASS if _OPS[op](est, value) else FAIL
        return Judgement(verdict, f"{label}: {est:.4g}, {n_text} → {verdict}")
    lo, hi = (_num(row, col) for col in ci_columns(metric))
    verdict = interval_verdict(lo, hi, op, value)
    text = f"{label}: {est:.4g} [{lo:.4g}, {hi:.4g}], {n_text} → {verdict}"
    if verdict != INCONCLUSIVE or not math.isfinite(n):
        return Judgement(verdict, text)
    if metric in RATE_METRICS:
        needed, approx = n_needed_wilson(est, int(n), op, value, conf), False
    else:
        needed, approx = n_needed_normal(est, lo, hi, int(n), value), True
    return Judgement(verdict, f"{text}, n needed {format_n_needed(needed, approx)}", needed,
                     approx)


def _paired_row(paired: pd.DataFrame | None, pathology: str, method: str, baseline: str,
                metric: str) -> dict | None:
    """The paired difference method - baseline of one pathology (a row recorded the other way
    round is negated)."""
    if paired is None or paired.empty or "pathology" not in paired:
        return None
    here = paired[(paired["pathology"].astype(str) == str(pathology))
                  & (paired["metric"] == metric)]
    forward = here[(here["method_a"] == method) & (here["method_b"] == baseline)]
    if len(forward):
        return forward.iloc[0].to_dict()
    backward = here[(here["method_a"] == baseline) & (here["method_b"] == method)]
    if not len(backward):
        return None
    r = backward.iloc[0].to_dict()
    r["mean_diff"], r["diff_lo"], r["diff_hi"] = -r["mean_diff"], -r["diff_hi"], -r["diff_lo"]
    return r


def _judge_beats(c: dict, row: dict, paired: pd.DataFrame | None) -> Judgement:
    label = criterion_label(c)
    r = _paired_row(paired, str(row.get("pathology")), str(row.get("method")), c["baseline"],
                    c["metric"])
    if r is None:
        return Judgement(NOT_APPLICABLE, f"{label}: does not apply ({c['baseline']} was not "
                                         "computed in this run)")
    d, lo, hi, n = (_num(r, k) for k in ("mean_diff", "diff_lo", "diff_hi", "n_pairs"))
    if not (math.isfinite(d) and math.isfinite(n) and n > 0):
        return Judgement(INCONCLUSIVE, f"{label}: no paired boxes → {INCONCLUSIVE}")
    verdict = PASS if lo > 0 else FAIL if hi <= 0 else INCONCLUSIVE
    text = f"{label}: {d:+.4g} [{lo:+.4g}, {hi:+.4g}], {int(n)} pairs → {verdict}"
    if verdict != INCONCLUSIVE:
        return Judgement(verdict, text)
    needed = n_needed_normal(d, lo, hi, int(n), 0.0)
    return Judgement(verdict, f"{text}, n needed {format_n_needed(needed, True)}", needed, True)


def _applies(c: dict, row: dict) -> bool:
    p, m = c.get("pathology", "*"), c.get("method", "*")
    if p != "*" and p != row.get("pathology"):
        return False
    if m == "*":
        return row.get("kind", "method") == "method"  # "*" never judges a baseline row
    return m == row.get("method")


def _combine(judgements: list[Judgement]) -> tuple[str, float, bool]:
    """(row verdict, n needed, approx): FAIL if any FAIL, else INCONCLUSIVE if any, else PASS;
    n needed is the largest over the inconclusive criteria of an INCONCLUSIVE row."""
    verdicts = [j.verdict for j in judgements if j.verdict]
    verdict = overall_verdict(verdicts, none="")
    if verdict != INCONCLUSIVE:
        return verdict, math.nan, False
    pending = [j for j in judgements if j.verdict == INCONCLUSIVE]
    worst = max(pending, key=lambda j: -1.0 if math.isnan(j.n_needed) else j.n_needed)
    return verdict, worst.n_needed, worst.approx


def overall_verdict(verdicts: Iterable[str], none: str = "NO CRITERIA") -> str:
    """FAIL if any verdict is FAIL, else INCONCLUSIVE if any is, else PASS; ``none`` when there is
    no verdict ("" entries do not count)."""
    given = [v for v in verdicts if v]
    if not given:
        return none
    if FAIL in given:
        return FAIL
    return INCONCLUSIVE if INCONCLUSIVE in given else PASS


def evaluate_criteria(per_pathology_df: pd.DataFrame, criteria: Sequence[dict],
                      paired: pd.DataFrame | None = None, conf: float = 0.95) -> pd.DataFrame:
    """Add ``verdict`` (PASS | FAIL | INCONCLUSIVE | "" when no criterion applies), ``criteria``
    (one text per applicable criterion: label, observed value with its CI and n, verdict, n
    needed; joined by "; "), ``n_needed`` and ``n_needed_approx`` to a per_pathology table.

    A criterion is ``{"pathology": name | "*", "method": name | "*", "metric": column, "op":
    ">=" | ">" | "<=" | "<" | "==" | "!=", "value": float, "use": "ci" | "estimate"}`` (``use``
    defaults to "ci") or a baseline criterion ``{"pathology", "method", "metric": per-box
    metric, "op": "beats", "baseline": name}`` judged on the ``paired`` table (paired.csv of
    the same run); a baseline the run did not compute makes its criterion not apply (said in
    the text). A "*" method matches rows of kind "method" only. ``n_needed`` (NaN unless the row
    is INCONCLUSIVE; ``inf`` = never) is the largest "n needed" of the row's inconclusive
    criteria; ``n_needed_approx`` is True when that figure is the normal approximation.
    """
    criteria = check_criteria(criteria)
    out = per_pathology_df.copy()
    verdicts, texts, needed, approx = [], [], [], []
    for row in out.to_dict("records"):
        judgements = [_judge_beats(c, row, paired) if c["op"] == BEATS
                      else _judge_metric(c, row, conf)
                      for c in criteria if _applies(c, row)]
        verdict, n_needed, is_approx = _combine(judgements)
        verdicts.append(verdict)
        texts.append("; ".join(j.text for j in judgements))
        needed.append(n_needed)
        approx.append(is_approx)
    out["verdict"] = verdicts
    out["criteria"] = texts
    out["n_needed"] = np.asarray(needed, dtype=np.float64)
    out["n_needed_approx"] = np.asarray(approx, dtype=bool)
    return out
