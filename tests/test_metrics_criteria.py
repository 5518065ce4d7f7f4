"""Acceptance criteria (audit/metrics/criteria.py): three-valued verdicts from the whole CI,
point-estimate criteria labelled as such, "n needed" against a brute-force search, baseline
criteria judged on the paired difference, validation, and the defaults."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.proportion import proportion_confint

from audit.config import ConfigError, build_settings
from audit.metrics.aggregation import wilson_interval
from audit.metrics.criteria import (
    check_criteria,
    evaluate_criteria,
    format_n_needed,
    interval_verdict,
    n_needed_normal,
    n_needed_wilson,
    overall_verdict,
)
from audit.protocol import BEATS, DEFAULT_CRITERIA, N_NEEDED_CAP, VERDICT_LEGEND, VERDICTS

POINTING_CI = {"pathology": "*", "method": "*", "metric": "pointing_rate", "op": ">=",
               "value": 0.5, "use": "ci"}


def rate_row(pathology: str, method: str, k: int, n: int, kind: str = "method") -> dict:
    lo, hi = wilson_interval(k, n)
    return {"pathology": pathology, "method": method, "kind": kind, "n": n,
            "pointing_rate": k / n, "pointing_lo": lo, "pointing_hi": hi,
            "iou_mean": 0.3, "iou_mean_lo": 0.2, "iou_mean_hi": 0.4}


def brute_force_n_needed(rate: float, op: str, value: float, limit: int = 5000) -> float:
    """The first n' whose Wilson CI at ``rate`` (statsmodels, fractional count) is decisive."""
    for m in range(1, limit):
        lo, hi = proportion_confint(rate * m, m, alpha=0.05, method="wilson")
        if interval_verdict(lo, hi, op, value) != "INCONCLUSIVE":
            return float(m)
    return math.inf


def verdict_of(table: pd.DataFrame, pathology: str, method: str) -> pd.Series:
    return table[(table.pathology == pathology) & (table.method == method)].iloc[0]


# ---- the verdict of one interval ------------------------------------------------------------


@pytest.mark.parametrize("lo,hi,op,value,want", [
    (0.55, 0.70, ">=", 0.5, "PASS"),          # whole CI above
    (0.50, 0.70, ">=", 0.5, "PASS"),          # lower bound on the criterion: >= holds
    (0.50, 0.70, ">", 0.5, "INCONCLUSIVE"),   # ... but > does not hold at the bound
    (0.20, 0.45, ">=", 0.5, "FAIL"),          # whole CI below
    (0.43, 0.65, ">=", 0.5, "INCONCLUSIVE"),  # straddles
    (0.10, 0.30, "<=", 0.3, "PASS"),
    (0.31, 0.40, "<=", 0.3, "FAIL"),
    (0.20, 0.40, "<", 0.3, "INCONCLUSIVE"),
    (math.nan, math.nan, ">=", 0.5, "INCONCLUSIVE"),
])
def test_interval_verdict_pass_fail_inconclusive(lo, hi, op, value, want):
    assert interval_verdict(lo, hi, op, value) == want


def test_overall_verdict_fail_then_inconclusive_then_pass():
    assert overall_verdict(["PASS", "INCONCLUSIVE", "FAIL"]) == "FAIL"
    assert overall_verdict(["PASS", "INCONCLUSIVE", ""]) == "INCONCLUSIVE"
    assert overall_verdict(["PASS", "PASS"]) == "PASS"
    assert overall_verdict(["", ""]) == "NO CRITERIA"


def test_the_legend_has_one_sentence_per_verdict():
    assert tuple(VERDICT_LEGEND) == VERDICTS == ("PASS", "FAIL", "INCONCLUSIVE")
    for text in VERDICT_LEGEND.values():
        assert text.endswith(".") and text.count(". ") == 0


# ---- criteria on crafted per_pathology tables -----------------------------------------------


def test_ci_criterion_pass_fail_and_inconclusive_with_n_and_n_needed():
    table = pd.DataFrame([
        rate_row("Mass", "gradcam", 60, 80),       # 0.75 [0.64, 0.83]: above 0.5
        rate_row("Nodule", "gradcam", 10, 60),     # 0.17 [0.09, 0.28]: below
        rate_row("Cardiomegaly", "gradcam", 38, 70),  # 0.543 [0.427, 0.654]: straddles
    ])
    out = evaluate_criteria(table, [POINTING_CI])
    assert verdict_of(out, "Mass", "gradcam").verdict == "PASS"
    assert verdict_of(out, "Nodule", "gradcam").verdict == "FAIL"
    row = verdict_of(out, "Cardiomegaly", "gradcam")
    assert row.verdict == "INCONCLUSIVE"  # a point-estimate rule would say PASS (0.543 >= 0.5)
    assert row.n_needed == brute_force_n_needed(38 / 70, ">=", 0.5) == 523
    assert not row.n_needed_approx
    assert row.criteria == ("pointing_rate >= 0.5 (95% CI): 0.5429 [0.427, 0.6543], n = 70 → "
                            "INCONCLUSIVE, n needed 523")
    # decisive rows need nothing more
    assert math.isnan(verdict_of(out, "Mass", "gradcam").n_needed)
    assert "n = 80 → PASS" in verdict_of(out, "Mass", "gradcam").criteria


def test_estimate_criterion_is_two_valued_and_labelled_point_estimate():
    table = pd.DataFrame([rate_row("Cardiomegaly", "gradcam", 38, 70)])
    crit = dict(POINTING_CI, use="estimate")
    row = evaluate_criteria(table, [crit]).iloc[0]
    assert row.verdict == "PASS"
    assert row.criteria == "pointing_rate >= 0.5 (point estimate): 0.5429, n = 70 → PASS"
    # without "use", a criterion is judged on its CI
    plain = {k: v for k, v in POINTING_CI.items() if k != "use"}
    assert evaluate_criteria(table, [plain]).iloc[0].verdict == "INCONCLUSIVE"


def test_the_issue_case_random_model_one_of_one_is_not_a_pass():
    # "pointing 1.000 [0.439, 1.000]" (3 of 3): a green PASS by the estimate, INCONCLUSIVE by
    # the CI, decisive at 4 boxes if every one were a hit (Wilson: 4 / (4 + z^2) >= 0.5).
    table = pd.DataFrame([rate_row("Cardiomegaly", "integrated_gradients", 3, 3)])
    row = evaluate_criteria(table, [POINTING_CI]).iloc[0]
    assert row.pointing_lo == pytest.approx(0.4385, abs=1e-4)
    assert row.verdict == "INCONCLUSIVE" and row.n_needed == 4
    assert evaluate_criteria(table, [dict(POINTING_CI, use="estimate")]).iloc[0].verdict == "PASS"
    table = pd.DataFrame([rate_row("Cardiomegaly", "integrated_gradients", 4, 4)])
    row = evaluate_criteria(table, [POINTING_CI]).iloc[0]
    assert row.pointing_lo == pytest.approx(0.5101, abs=1e-4) and row.verdict == "PASS"


@pytest.mark.parametrize("k,n,op,value", [
    (38, 70, ">=", 0.5), (3, 7, ">=", 0.5), (1, 1, ">=", 0.5), (2, 9, "<=", 0.1),
    (30, 40, ">", 0.6), (11, 20, "<", 0.5), (0, 3, ">=", 0.2), (7, 7, "<", 0.9),
])
def test_n_needed_equals_a_brute_force_search_of_the_wilson_interval(k, n, op, value):
    assert n_needed_wilson(k / n, n, op, value) == brute_force_n_needed(k / n, op, value)


def test_n_needed_is_never_when_the_rate_equals_the_criterion():
    assert n_needed_wilson(0.5, 10, ">=", 0.5) == math.inf
    assert format_n_needed(math.inf) == "never"
    # and beyond the cap: 0.501 vs 0.5 needs about a million boxes
    assert n_needed_wilson(0.501, 1000, ">=", 0.5) == math.inf
    assert n_needed_wilson(0.6, 10, ">=", 0.5, cap=50) == math.inf
    assert N_NEEDED_CAP == 100_000
    table = pd.DataFrame([rate_row("Mass", "gradcam", 5, 10)])
    row = evaluate_criteria(table, [POINTING_CI]).iloc[0]
    assert row.verdict == "INCONCLUSIVE" and row.n_needed == math.inf
    assert row.criteria.endswith("n needed never")


def test_n_needed_of_a_bootstrap_mean_is_the_labelled_normal_approximation():
    # mean 0.3, CI [0.2, 0.4] over 25 units, criterion 0.25: half-width 0.1 facing the value,
    # gap 0.05 -> 25 * (0.1 / 0.05)^2 = 100 units
    assert n_needed_normal(0.3, 0.2, 0.4, 25, 0.25) == 100
    table = pd.DataFrame([dict(rate_row("Mass", "gradcam", 60, 80), n=25)])
    crit = {"metric": "iou_mean", "op": ">=", "value": 0.25}
    row = evaluate_criteria(table, [crit]).iloc[0]
    assert row.verdict == "INCONCLUSIVE" and row.n_needed == 100 and row.n_needed_approx
    assert row.criteria.endswith("n needed ≈ 100")
    assert format_n_needed(100.0, approx=True) == "≈ 100"


def test_a_row_fails_if_any_criterion_fails_else_inconclusive_if_any_is():
    table = pd.DataFrame([rate_row("Mass", "gradcam", 38, 70)])  # pointing straddles 0.5
    failing_iou = {"metric": "iou_mean", "op": ">=", "value": 0.5}  # CI [0.2, 0.4]: FAIL
    passing_iou = {"metric": "iou_mean", "op": ">=", "value": 0.1}
    out = evaluate_criteria(table, [POINTING_CI, failing_iou]).iloc[0]
    assert out.verdict == "FAIL" and math.isnan(out.n_needed)
    out = evaluate_criteria(table, [POINTING_CI, passing_iou]).iloc[0]
    assert out.verdict == "INCONCLUSIVE" and out.n_needed == 523
    assert out.criteria.count("; ") == 1


def test_wildcard_method_judges_methods_not_baselines():
    table = pd.DataFrame([rate_row("Mass", "gradcam", 60, 80),
                          rate_row("Mass", "random", 10, 80, kind="baseline")])
    out = evaluate_criteria(table, [POINTING_CI])
    assert verdict_of(out, "Mass", "random").verdict == ""
    named = dict(POINTING_CI, method="random")
    assert verdict_of(evaluate_criteria(table, [named]), "Mass", "random").verdict == "FAIL"


# ---- baseline criteria ----------------------------------------------------------------------


def paired_row(pathology, method_a, method_b, diff, lo, hi, n=50, metric="pointing_hit"):
    return {"pathology": pathology, "method_a": method_a, "method_b": method_b, "metric": metric,
            "n_pairs": n, "mean_a": 0.5, "mean_b": 0.5 - diff, "mean_diff": diff,
            "diff_lo": lo, "diff_hi": hi, "p_boot": 0.5}


BEATS_CENTRE = {"pathology": "*", "method": "*", "metric": "pointing_hit", "op": BEATS,
                "baseline": "centre_prior"}


@pytest.mark.parametrize("diff,lo,hi,want", [
    (0.20, 0.08, 0.32, "PASS"),           # CI above 0: beats the centre prior
    (-0.20, -0.32, -0.08, "FAIL"),        # CI below 0
    (0.0, 0.0, 0.0, "FAIL"),              # identical on every box: cannot be shown to beat it
    (-0.05, -0.12, 0.0, "FAIL"),          # CI at or below 0
    (0.04, -0.06, 0.14, "INCONCLUSIVE"),  # straddles 0
])
def test_beats_baseline_from_the_paired_difference(diff, lo, hi, want):
    table = pd.DataFrame([rate_row("Mass", "gradcam", 60, 80)])
    paired = pd.DataFrame([paired_row("Mass", "gradcam", "centre_prior", diff, lo, hi)])
    row = evaluate_criteria(table, [BEATS_CENTRE], paired).iloc[0]
    assert row.verdict == want
    assert row.criteria.startswith(
        "pointing_hit beats Centre prior (paired difference, 95% CI): ")
    assert "50 pairs" in row.criteria
    if want == "INCONCLUSIVE":
        # half-width below the estimate 0.10, gap 0.04: 50 * (0.10 / 0.04)^2 = 312.5 -> 313
        assert row.n_needed == 313 and row.n_needed_approx
        assert row.criteria.endswith("n needed ≈ 313")
    else:
        assert math.isnan(row.n_needed)


def test_a_pair_recorded_baseline_first_is_negated():
    table = pd.DataFrame([rate_row("Mass", "gradcam", 60, 80)])
    paired = pd.DataFrame([paired_row("Mass", "centre_prior", "gradcam", -0.2, -0.3, -0.1)])
    row = evaluate_criteria(table, [BEATS_CENTRE], paired).iloc[0]
    assert row.verdict == "PASS" and "+0.2 [+0.1, +0.3]" in row.criteria


def test_a_baseline_not_computed_does_not_apply_and_says_so():
    table = pd.DataFrame([rate_row("Mass", "gradcam", 60, 80)])
    paired = pd.DataFrame([paired_row("Mass", "gradcam", "random", 0.3, 0.2, 0.4)])
    row = evaluate_criteria(table, [BEATS_CENTRE], paired).iloc[0]
    assert row.verdict == ""
    assert row.criteria == ("pointing_hit beats Centre prior (paired difference, 95% CI): "
                            "does not apply (centre_prior was not computed in this run)")
    row = evaluate_criteria(table, [POINTING_CI, BEATS_CENTRE], None).iloc[0]
    assert row.verdict == "PASS"  # judged by the criterion that applies
    assert "does not apply" in row.criteria


def test_default_criteria_on_a_crafted_run():
    table = pd.DataFrame([rate_row("Mass", "gradcam", 60, 80),
                          rate_row("Mass", "centre_prior", 50, 80, kind="baseline"),
                          rate_row("Mass", "average_box", 55, 80, kind="baseline")])
    paired = pd.DataFrame([
        paired_row("Mass", "gradcam", "centre_prior", 0.125, 0.03, 0.22, n=80),
        paired_row("Mass", "gradcam", "average_box", 0.0625, -0.03, 0.15, n=80),
    ])
    out = evaluate_criteria(table, DEFAULT_CRITERIA, paired)
    row = verdict_of(out, "Mass", "gradcam")
    assert row.verdict == "INCONCLUSIVE"  # rate PASS, beats centre PASS, beats average box: ?
    texts = row.criteria.split("; ")
    assert [t.rsplit("→ ", 1)[1].split(",")[0] for t in texts] == [
        "PASS", "PASS", "INCONCLUSIVE"]
    assert set(out[out.kind == "baseline"].verdict) == {""}


# ---- validation and defaults ----------------------------------------------------------------


def test_default_criteria_are_valid_and_judged_by_ci_and_baselines():
    assert check_criteria(DEFAULT_CRITERIA) == [dict(c) for c in DEFAULT_CRITERIA]
    assert DEFAULT_CRITERIA[0]["use"] == "ci" and DEFAULT_CRITERIA[0]["metric"] == "pointing_rate"
    assert {c.get("baseline") for c in DEFAULT_CRITERIA if c["op"] == BEATS} == {
        "centre_prior", "average_box"}
    assert build_settings({}, {"random_init": True, "images": "x"}).acceptance == [
        dict(c) for c in DEFAULT_CRITERIA]


@pytest.mark.parametrize("criterion,message", [
    ({"metric": "pointing_rate", "op": "~", "value": 0.5}, "op must be one of"),
    ({"metric": "pointing_rate", "op": "==", "value": 0.5}, "a CI criterion needs"),
    ({"metric": "iobb_mean", "op": ">=", "value": 0.5}, "metric must be one of"),
    ({"metric": "no_such_column", "op": ">=", "value": 0}, "metric must be one of"),
    ({"metric": "pointing_rate", "op": ">=", "value": 0.5, "use": "ci_low"}, "use must be"),
    ({"metric": "pointing_rate", "op": ">=", "value": "half"}, "value must be"),
    ({"metric": "pointing_hit", "op": BEATS, "baseline": "blob"}, "baseline must be"),
    ({"metric": "pointing_rate", "op": BEATS, "baseline": "random"}, "per-box metric"),
    ({"metric": "pointing_rate", "op": ">=", "value": 0.5, "method": "gradcan"},
     "unknown method"),
])
def test_invalid_criteria_are_one_line_errors(criterion, message):
    with pytest.raises(ValueError, match=message):
        check_criteria([criterion])
    with pytest.raises(ConfigError, match=message):
        build_settings({}, {"random_init": True, "images": "x", "acceptance": [criterion]})


def test_estimate_only_metrics_are_allowed_with_use_estimate():
    crit = {"metric": "iobb_mean", "op": ">=", "value": 0.2, "use": "estimate"}
    table = pd.DataFrame([dict(rate_row("Mass", "gradcam", 1, 2), iobb_mean=0.25)])
    assert evaluate_criteria(table, [crit]).iloc[0].verdict == "PASS"


def test_the_run_assembles_baseline_pairs_and_verdicts_with_the_defaults():
    from audit.config import AuditSettings
    from audit.run.assemble import aggregates

    rng = np.random.default_rng(0)
    rows = []
    for i in range(30):
        for method, p_hit in (("gradcam", 0.9), ("centre_prior", 0.3), ("average_box", 0.85)):
            hit = bool(rng.random() < p_hit)
            rows.append({"image_key": f"img{i}", "finding": "Mass", "model_finding": "Mass",
                         "pathology": "Mass", "box_index": 0, "method": method,
                         "iou": float(rng.random()), "iobb": 0.5, "coverage": 0.5,
                         "pointing_hit": hit})
    settings = AuditSettings(methods=["gradcam"], random_init=True, images="x")
    per_pathology, paired = aggregates(pd.DataFrame(rows), settings)
    assert {("gradcam", b) for b in ("centre_prior", "average_box")} <= set(
        zip(paired.method_a, paired.method_b, strict=True))
    row = verdict_of(per_pathology, "Mass", "gradcam")
    assert row.verdict in VERDICTS and row.criteria.count("; ") == 2
    assert "beats Centre prior" in row.criteria and "beats Average expert box" in row.criteria
