"""Aggregation: Wilson and bootstrap intervals vs references, per-pathology table, paired
differences (between methods and between runs), stratified sampling. Acceptance criteria:
tests/test_metrics_criteria.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import bootstrap
from statsmodels.stats.proportion import proportion_confint

from audit.metrics.aggregation import (
    aggregate_per_pathology,
    bootstrap_ci,
    collapse_boxes,
    paired_difference,
    paired_run_difference,
    wilson_bounds,
    wilson_interval,
)
from audit.metrics.criteria import ci_columns
from audit.metrics.sampling import stratified_sample

# ------------------------------------------------------------------ Wilson


@pytest.mark.parametrize(
    "k,n", [(0, 10), (5, 10), (10, 10), (3, 10), (45, 100), (1, 1), (0, 1), (17, 23)]
)
def test_wilson_matches_statsmodels(k, n):
    ref = proportion_confint(k, n, alpha=0.05, method="wilson")
    np.testing.assert_allclose(wilson_interval(k, n), ref, rtol=0, atol=1e-12)
    ref90 = proportion_confint(k, n, alpha=0.10, method="wilson")
    np.testing.assert_allclose(wilson_interval(k, n, conf=0.90), ref90, rtol=0, atol=1e-12)


def test_wilson_bounds_at_a_rate_equal_the_interval_at_integer_counts():
    for k, n in ((3, 7), (0, 5), (5, 5), (38, 70)):
        assert wilson_bounds(k / n, n) == wilson_interval(k, n)
    # a fractional count: statsmodels computes the same formula
    ref = proportion_confint(0.5429 * 300, 300, alpha=0.05, method="wilson")
    np.testing.assert_allclose(wilson_bounds(0.5429, 300), ref, rtol=0, atol=1e-12)


def test_wilson_hand_computed_values():
    z2 = 1.959963984540054**2
    # 0 of 10: (0, z^2 / (n + z^2))
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(z2 / (10 + z2), abs=1e-12)
    assert hi == pytest.approx(0.2775, abs=5e-5)
    # 5 of 10: symmetric around 0.5, half-width z*sqrt(0.025 + z^2/400)/(1 + z^2/10)
    lo, hi = wilson_interval(5, 10)
    half = 1.959963984540054 * np.sqrt(0.25 / 10 + z2 / 400) / (1 + z2 / 10)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=5e-5)
    assert wilson_interval(10, 10)[1] == 1.0
    assert all(np.isnan(wilson_interval(0, 0)))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


# ------------------------------------------------------------------ bootstrap

DATA = np.array([0.12, 0.55, 0.31, 0.0, 0.78, 0.43, 0.26, 0.61, 0.05, 0.39, 0.47, 0.9, 0.33])


@pytest.mark.parametrize("stat", [np.mean, np.median])
def test_bootstrap_percentile_ci_equals_scipy_with_the_same_resamples(stat):
    ours = bootstrap_ci(DATA, stat, n_boot=2000, seed=42)
    ref = bootstrap(
        (DATA,),
        stat,
        n_resamples=2000,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(42),
    ).confidence_interval
    # Same generator, same draws (rng.integers(0, n, (n_boot, n))), same linear quantile.
    assert ours == pytest.approx((ref.low, ref.high), abs=1e-12)


def test_bootstrap_ci_is_statistically_close_to_scipy_with_other_resamples():
    # Different seeds: CI bounds of the mean agree within 0.03 (≈ 0.15 x the CI width of
    # 0.2; Monte-Carlo error of a 2.5% quantile with 4000 resamples is well below that).
    ours = bootstrap_ci(DATA, np.mean, n_boot=4000, seed=1)
    ref = bootstrap(
        (DATA,), np.mean, n_resamples=4000, method="percentile", rng=np.random.default_rng(99)
    ).confidence_interval
    assert ours == pytest.approx((ref.low, ref.high), abs=0.03)


def test_bootstrap_ci_edge_cases_and_non_vectorized_stat():
    assert all(np.isnan(bootstrap_ci([], np.mean)))
    assert bootstrap_ci([0.4], np.mean) == (0.4, 0.4)
    assert bootstrap_ci([0.2, np.nan, 0.2], np.mean) == (0.2, 0.2)  # NaN dropped
    f = lambda v: float(np.mean(v))  # noqa: E731 (no axis argument)
    assert bootstrap_ci(DATA, f, n_boot=500, seed=3) == pytest.approx(
        bootstrap_ci(DATA, np.mean, n_boot=500, seed=3)
    )
    assert bootstrap_ci(DATA, seed=5) == bootstrap_ci(DATA, seed=5)


# ------------------------------------------------------------------ per pathology


def boxes_frame():
    rows = []
    # Cardiomegaly: 4 images, one with two boxes (counts once, best match).
    for method, ious, hits in [
        ("gradcam", [0.6, 0.2, 0.4, 0.0], [True, False, True, False]),
        ("random", [0.1, 0.0, 0.05, 0.0], [False, False, False, False]),
    ]:
        for i, (iou, hit) in enumerate(zip(ious, hits, strict=True)):
            rows.append(
                dict(
                    image_key=f"c{i}",
                    finding="Cardiomegaly",
                    box_index=0,
                    method=method,
                    iou=iou,
                    iobb=min(1.0, 2 * iou),
                    pointing_hit=hit,
                )
            )
        rows.append(
            dict(
                image_key="c1",
                finding="Cardiomegaly",
                box_index=1,
                method=method,
                iou=0.3 if method == "gradcam" else 0.0,
                iobb=0.1,
                pointing_hit=method == "gradcam",
            )
        )
    for method in ("gradcam", "random"):
        rows.append(
            dict(
                image_key="n0",
                finding="Nodule",
                box_index=0,
                method=method,
                iou=0.05,
                iobb=0.3,
                pointing_hit=False,
            )
        )
    df = pd.DataFrame(rows)
    for fam in ("iou", "iobb"):
        for t in (0.1, 0.25, 0.5):
            df[f"{fam}_hit_{t:g}"] = df[fam] >= t
    return df


def test_collapse_boxes_keeps_one_row_per_image_finding_with_best_values():
    c = collapse_boxes(boxes_frame())
    assert len(c) == 2 * 5
    row = c[(c.image_key == "c1") & (c.method == "gradcam")].iloc[0]
    assert row["iou"] == 0.3  # max(0.2, 0.3)
    assert row["iobb"] == 0.4  # max(0.4, 0.1)
    assert row["pointing_hit"]  # any box
    assert row["box_index"] == 1  # the best-IoU row
    assert row["n_boxes"] == 2


def test_aggregate_per_pathology_columns_and_values():
    agg = aggregate_per_pathology(boxes_frame(), seed=0, n_boot=500)
    expected_lead = [
        "pathology",
        "method",
        "kind",
        "n",
        "iou_mean",
        "iou_mean_lo",
        "iou_mean_hi",
        "iou_median",
    ]
    assert list(agg.columns[: len(expected_lead)]) == expected_lead
    for col in [
        "pointing_rate",
        "pointing_lo",
        "pointing_hi",
        "iobb_hit_0.1_rate",
        "iobb_hit_0.25_rate",
        "iobb_hit_0.5_rate",
        "iou_hit_0.1_rate",
        "iou_hit_0.5_lo",
        "verdict",
        "criteria",
    ]:
        assert col in agg.columns
    r = agg[(agg.pathology == "Cardiomegaly") & (agg.method == "gradcam")].iloc[0]
    assert r["n"] == 4 and r["kind"] == "method"
    ious = np.array([0.6, 0.3, 0.4, 0.0])
    assert r["iou_mean"] == pytest.approx(ious.mean())
    assert r["iou_median"] == pytest.approx(np.median(ious))
    assert (r["iou_mean_lo"], r["iou_mean_hi"]) == pytest.approx(
        bootstrap_ci(ious, np.mean, 500, 0)
    )
    assert r["pointing_rate"] == 0.75
    assert (r["pointing_lo"], r["pointing_hi"]) == pytest.approx(wilson_interval(3, 4))
    assert r["iou_hit_0.5_rate"] == 0.25
    base = agg[(agg.pathology == "Cardiomegaly") & (agg.method == "random")].iloc[0]
    assert base["kind"] == "baseline"
    assert agg["verdict"].eq("").all()


def test_aggregate_overall_rows():
    agg = aggregate_per_pathology(boxes_frame(), n_boot=200, include_overall=True)
    r = agg[(agg.pathology == "All") & (agg.method == "gradcam")].iloc[0]
    assert r["n"] == 5


# ------------------------------------------------------------------ paired difference


def test_paired_difference_of_a_constant_shift_is_exact():
    df = boxes_frame()
    shifted = df[df.method == "gradcam"].copy()
    shifted["method"] = "gradcampp"
    shifted["iou"] = shifted["iou"] + 0.1
    both = pd.concat([df, shifted]).sample(frac=1.0, random_state=0)  # order must not matter
    out = paired_difference(both, "gradcampp", "gradcam", "iou", seed=0, n_boot=300)
    r = out.iloc[0]
    assert r["n_pairs"] == 6  # pairs are boxes (image_key + finding + box_index)
    assert r["mean_diff"] == pytest.approx(0.1)
    assert (r["diff_lo"], r["diff_hi"]) == pytest.approx((0.1, 0.1))
    assert r["p_boot"] == 0.0
    best = paired_difference(both, "gradcampp", "gradcam", "iou", best_match=True).iloc[0]
    assert best["n_pairs"] == 5
    by = paired_difference(both, "gradcam", "random", "iou", by="finding", n_boot=300)
    assert list(by["finding"]) == ["Cardiomegaly", "Nodule"]
    assert by["n_pairs"].tolist() == [5, 1]


def test_paired_run_difference_pairs_only_units_both_runs_scored():
    old = boxes_frame()
    old["sha256"] = "h-" + old["image_key"]
    new = old.copy()
    new["iou"] = new["iou"] - 0.05  # every unit 0.05 worse
    new = new[new.image_key != "c3"]  # one image only in the old run
    extra = new[new.image_key == "c0"].assign(image_key="c9", sha256="h-c9")  # only in new
    new = pd.concat([new, extra], ignore_index=True)
    out = paired_run_difference(old, new, "iou", n_boot=300)
    assert list(out.columns) == ["pathology", "method", "metric", "n_pairs", "mean_new",
                                 "mean_old", "mean_diff", "diff_lo", "diff_hi", "p_boot"]
    card = out[(out.pathology == "Cardiomegaly") & (out.method == "gradcam")].iloc[0]
    assert card["n_pairs"] == 3  # c0, c1 (two boxes, best match), c2; not c3, not c9
    assert card["mean_old"] == pytest.approx(np.mean([0.6, 0.3, 0.4]))
    assert card["mean_diff"] == pytest.approx(-0.05)
    assert (card["diff_lo"], card["diff_hi"]) == pytest.approx((-0.05, -0.05))
    # the same image key holding another file is not the same unit
    renamed = new.assign(sha256=new["sha256"].where(new.image_key != "c0", "other"))
    again = paired_run_difference(old, renamed, "iou", n_boot=300)
    assert again[(again.pathology == "Cardiomegaly")
                 & (again.method == "gradcam")].iloc[0]["n_pairs"] == 2


def test_paired_difference_identical_methods_is_zero_with_p_one():
    df = boxes_frame()
    twin = df[df.method == "gradcam"].copy()
    twin["method"] = "twin"
    r = paired_difference(pd.concat([df, twin]), "gradcam", "twin", "iou").iloc[0]
    assert r["mean_diff"] == 0.0 and r["p_boot"] == 1.0


# ------------------------------------------------------------------ criteria


def test_ci_columns():
    assert ci_columns("pointing_rate") == ("pointing_lo", "pointing_hi")
    assert ci_columns("iou_hit_0.5_rate") == ("iou_hit_0.5_lo", "iou_hit_0.5_hi")
    assert ci_columns("iou_mean") == ("iou_mean_lo", "iou_mean_hi")


# ------------------------------------------------------------------ sampling


def test_stratified_sample_is_deterministic_capped_and_order_independent():
    df = pd.DataFrame(
        {
            "image_key": [f"i{k}" for k in range(30)],
            "finding": ["A"] * 20 + ["B"] * 7 + [None] * 3,
        }
    )
    s1 = stratified_sample(df, 5, "finding", seed=3, sort_by=["image_key"])
    s2 = stratified_sample(
        df.sample(frac=1, random_state=1), 5, "finding", seed=3, sort_by=["image_key"]
    )
    assert list(s1.image_key) == list(s2.image_key)
    assert s1.groupby("finding").size().to_dict() == {"A": 5, "B": 5}
    assert s1.attrs["sampling"]["groups"] == {
        "A": {"size": 20, "sampled": 5},
        "B": {"size": 7, "sampled": 5},
    }
    assert list(s1[s1.finding == "A"].sample_rank) == [0, 1, 2, 3, 4]
    s3 = stratified_sample(df, 5, "finding", seed=4, sort_by=["image_key"])
    assert list(s3.image_key) != list(s1.image_key)
    big = stratified_sample(df, 100, "finding", seed=0)
    assert len(big) == 27  # missing groups are never sampled


def test_stratified_sample_by_unit_keeps_images_whole():
    df = pd.DataFrame(
        {
            "image_key": ["a", "a", "b", "c", "c", "d"],
            "finding": ["Mass"] * 6,
            "box_index": [0, 1, 0, 0, 1, 0],
        }
    )
    s = stratified_sample(df, 2, "finding", seed=0, unit_col="image_key")
    assert s.image_key.nunique() == 2
    for key, grp in s.groupby("image_key"):
        assert len(grp) == (df.image_key == key).sum()


def test_aggregate_without_image_key_counts_every_row():
    df = boxes_frame().drop(columns=["image_key"])
    agg = aggregate_per_pathology(df, n_boot=100)
    r = agg[(agg.pathology == "Cardiomegaly") & (agg.method == "gradcam")].iloc[0]
    assert r["n"] == 5
    with pytest.raises(KeyError):
        collapse_boxes(df)
