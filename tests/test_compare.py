"""The regression check between two recorded runs (audit/store/compare.py, `Registry.compare`):
the paired bootstrap of new - old on the boxes both run directories hold; a regression only when
its 95% CI lies wholly below 0, "not enough evidence" when it straddles 0, "cannot judge" without
the run directories. (The `cxr-audit compare` command: tests/test_registry.py, on SQLite and
PostgreSQL.)"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from registry_fixtures import (
    BASE_HITS,
    BASE_IOU,
    N_IMAGES,
    ROWS_A,
    ROWS_B,
    T_A,
    T_B,
    box_rows,
    by_key,
    make_run_dir,
    make_run_dirs,
    record,
    registries,
    row,
)

from audit.store.compare import compare_runs
from audit.store.registry import Registry


@pytest.fixture
def run_dirs(tmp_path) -> dict[str, Path]:
    return make_run_dirs(tmp_path / "reports")


@pytest.fixture
def make_registry(tmp_path):  # the comparison does not depend on the backend: SQLite only
    with registries(f"sqlite:///{tmp_path / 'registry.sqlite'}") as make:
        yield make


@pytest.fixture
def recorded(make_registry, run_dirs) -> Registry:
    return record(make_registry(), run_dirs, ("U", "B", "A"))


def test_compare_flags_a_regression_only_when_the_paired_ci_is_below_zero(recorded):
    table, notes = recorded.compare("run-A", "run-B")
    assert notes == []
    rows = by_key(table)
    assert set(rows) == {(r["pathology"], r["method"]) for r in ROWS_A + ROWS_B}
    assert list(table[["pathology", "method"]].itertuples(index=False, name=None)) == sorted(rows)

    # (1) every unit 0.1 lower: the CI of new - old lies wholly below 0
    mass = rows[("Mass", "gradcam")]
    assert mass["regression"] is True
    assert mass["n_pairs"] == N_IMAGES
    assert mass["iou_diff"] == pytest.approx(-0.1)
    assert mass["iou_diff_hi"] < 0 and mass["iou_evidence"] == "regression"
    assert mass["iou_old"] == pytest.approx(np.mean(BASE_IOU))
    assert mass["pointing_evidence"] == "no change"
    assert mass["why"] == "iou: 95% CI of the paired difference new - old wholly below 0"

    # (2) noise in both directions: not enough evidence, not a regression
    noise = rows[("Mass", "gradcampp")]
    assert noise["iou_diff_lo"] < 0 < noise["iou_diff_hi"]
    assert noise["iou_evidence"] == "not enough evidence"
    assert noise["pointing_evidence"] == "not enough evidence"
    assert noise["regression"] is False and noise["why"] == ""
    assert (noise["verdict_old"], noise["verdict_new"]) == ("INCONCLUSIVE", "INCONCLUSIVE")

    # (3) PASS -> FAIL whose paired change straddles 0 is not a regression (the old rule
    # "PASS became FAIL" flagged it)
    nodule = rows[("Nodule", "gradcam")]
    assert (nodule["verdict_old"], nodule["verdict_new"]) == ("PASS", "FAIL")
    assert nodule["iou_diff"] == pytest.approx(-0.01)
    assert nodule["iou_evidence"] == "not enough evidence"
    assert nodule["regression"] is False

    # (4) an improvement
    atel = rows[("Atelectasis", "gradcam")]
    assert atel["iou_evidence"] == "improvement" and atel["pointing_evidence"] == "improvement"
    assert atel["regression"] is False

    assert rows[("Mass", "random")]["iou_evidence"] == "no change"

    # (5) pathologies present in one run only: nothing to pair, nothing judged
    gone, new = rows[("Effusion", "gradcam")], rows[("Pneumothorax", "gradcam")]
    assert gone["iou_evidence"] == "cannot judge (only in the old run)"
    assert new["pointing_evidence"] == "cannot judge (only in the new run)"
    assert gone["n_pairs"] == new["n_pairs"] == 0
    assert math.isnan(gone["iou_diff"])
    assert (gone["verdict_old"], gone["verdict_new"]) == ("PASS", "")
    assert not gone["regression"] and not new["regression"]

    assert sorted(k for k, r in rows.items() if r["regression"]) == [("Mass", "gradcam")]


def test_compare_improved_run_has_no_regression(recorded):
    table, _ = recorded.compare("run-A", "run-U")
    assert len(table) == len(ROWS_A)
    assert not table["regression"].any()
    assert (table["iou_diff"] > 0).all()
    assert set(table["iou_evidence"]) == {"improvement"}
    assert (table["why"] == "").all()


def test_compare_a_run_with_itself_has_no_regression(recorded):
    table, _ = recorded.compare("run-B", "run-B")
    assert not table["regression"].any()
    assert set(table["iou_evidence"]) == {"no change"}
    assert (table["iou_diff"] == 0).all()


def test_compare_pairs_only_the_images_both_runs_scored(make_registry, tmp_path):
    # the new run scored other images too, much worse; only the shared ten are compared
    reg = make_registry()
    rows = [row("Mass", "gradcam", (0.4, 0.3, 0.5), (0.6, 0.5, 0.7), "PASS")]
    old = box_rows("Mass", "gradcam", BASE_IOU[:10], BASE_HITS[:10])
    others = [dict(r, image_key=f"new-{i}", sha256=f"new-{i}", iou=0.0, pointing_hit=False)
              for i, r in enumerate(old)]
    reg.record_run(make_run_dir(tmp_path, "run-1", T_A, rows, boxes=old))
    reg.record_run(make_run_dir(tmp_path, "run-2", T_B, rows, boxes=old + others))
    (only,) = reg.compare("run-1", "run-2")[0].to_dict("records")
    assert only["n_pairs"] == 10
    assert only["iou_evidence"] == "no change" and only["regression"] is False


def test_compare_without_a_run_directory_cannot_judge(make_registry, run_dirs):
    reg = make_registry()
    reg.record_run(run_dirs["A"])
    reg.record_run(run_dirs["B"])
    shutil.rmtree(run_dirs["A"])
    table, notes = reg.compare("run-A", "run-B")
    assert notes == [f"run-A: run directory missing ({run_dirs['A'].resolve()}); cannot judge"]
    assert not table["regression"].any()
    both = table[table.n_pairs.eq(0) & table.verdict_old.ne("") & table.verdict_new.ne("")]
    assert len(both) == 4 and set(both["iou_evidence"]) == {
        "cannot judge (run directory missing)"}
    # the recorded aggregates are still shown, nothing is paired or guessed
    mass = by_key(table)[("Mass", "gradcam")]
    assert (mass["iou_old"], mass["iou_new"]) == pytest.approx((0.40, 0.30))
    assert math.isnan(mass["iou_diff"])


def test_compare_runs_on_plain_frames():
    old = pd.DataFrame([row("Mass", "gradcam", (0.4, 0.35, 0.45), (0.6, 0.5, 0.7), "PASS")])
    new = pd.DataFrame([row("Mass", "gradcam", (0.3, 0.25, 0.35), (0.6, 0.5, 0.7), "FAIL")])
    before = pd.DataFrame(box_rows("Mass", "gradcam", BASE_IOU, BASE_HITS))
    after = pd.DataFrame(box_rows("Mass", "gradcam", BASE_IOU, [False] * N_IMAGES))
    (only,) = compare_runs(old, new, before, after, n_boot=500).to_dict("records")
    assert only["pointing_evidence"] == "regression" and only["iou_evidence"] == "no change"
    assert only["pointing_diff"] == pytest.approx(-np.mean(BASE_HITS))
    assert only["regression"] is True
    assert only["why"] == "pointing: 95% CI of the paired difference new - old wholly below 0"
    (unjudged,) = compare_runs(old, new, before, None).to_dict("records")
    assert unjudged["regression"] is False
    assert unjudged["iou_evidence"] == "cannot judge (run directory missing)"
