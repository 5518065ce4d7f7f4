"""The phantom calibration's checks, each shown to pass and to fail on crafted run tables.

The run directories here are minimal (only the tables the calibration reads: per_pathology,
images, predictions and the saved Grad-CAM maps); the numbers are made up to sit on either side
of each check's bound.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from audit.phantom.calibration import (
    CAM_METHODS,
    MIN_RANDOMIZATION_MAPS,
    POSITION_VARYING,
    auroc_check,
    calibrate,
    expected_verdict,
    marker_check,
    marker_fraction,
    randomization_check,
    verdict_check,
)
from audit.phantom.generate import marker_box
from audit.store.files import write_npz
from audit.store.rundir import saved_map_key

FINDINGS = (*POSITION_VARYING, "Nodule", "Cardiomegaly")
METHODS = (*CAM_METHODS, "integrated_gradients")
MARKER = marker_box(1024)


def _per_pathology(verdicts: dict[tuple[str, str], str], default: str) -> pd.DataFrame:
    rows = []
    for finding in FINDINGS:
        for method in (*METHODS, "centre_prior", "average_box"):
            kind = "baseline" if method in ("centre_prior", "average_box") else "method"
            verdict = verdicts.get((finding, method), default if kind == "method" else "")
            rate = {"PASS": 0.95, "FAIL": 0.05}.get(verdict, 0.5)
            rows.append({"pathology": finding, "method": method, "kind": kind, "n": 20,
                         "pointing_rate": rate, "pointing_lo": rate - 0.1,
                         "pointing_hi": rate + 0.05, "iou_mean": rate / 2,
                         "iou_mean_lo": rate / 2 - 0.05, "iou_mean_hi": rate / 2 + 0.05,
                         "verdict": verdict})
    return pd.DataFrame(rows)


def _peak_map(on_marker: bool, size: int = 224) -> np.ndarray:
    saliency = np.zeros((size, size), dtype=np.float16)
    if on_marker:
        saliency[15, 15] = 1.0  # inside the marker box (10.5..25.8, 10.5..32 at 224)
    else:
        saliency[150, 60] = 1.0
    return saliency


def make_run(root: Path, verdicts: dict[tuple[str, str], str] | None = None,
             default: str = "PASS", marker_hits: int = 0, mass_maps: int = 8,
             randomization: list[float] | None = None, mass_auroc_high: bool = True) -> Path:
    """A minimal run directory with the tables the calibration reads."""
    root.mkdir(parents=True)
    _per_pathology(verdicts or {}, default).to_csv(root / "per_pathology.csv", index=False)
    values = [0.2] * MIN_RANDOMIZATION_MAPS if randomization is None else randomization
    images = pd.DataFrame({"image_key": [f"img{i}" for i in range(len(values))],
                           "finding": "Mass", "method": "gradcam",
                           "randomization_final_spearman_abs": values})
    images.to_csv(root / "images.csv", index=False)
    labels = np.array([1, 0] * 10, dtype=float)
    probability = labels * 0.8 + 0.1 if mass_auroc_high else np.linspace(0.1, 0.9, 20)
    pd.DataFrame({"image_key": [f"img{i}" for i in range(20)], "finding": "Mass",
                  "probability": probability, "label": labels}).to_csv(
        root / "predictions.csv", index=False)
    (root / "maps").mkdir()
    write_npz(root / "maps" / "gradcam.npz",
              {saved_map_key(f"img{i}", "Mass"): _peak_map(i < marker_hits)
               for i in range(mass_maps)})
    return root


# ---- each check both ways -------------------------------------------------------------------


def test_verdict_check_passes_only_when_every_finding_has_the_expected_verdict() -> None:
    good = _per_pathology({}, "PASS")
    assert all(c["passed"] for c in verdict_check("honest", good, CAM_METHODS,
                                                   POSITION_VARYING, "PASS"))
    one_inconclusive = _per_pathology({("Effusion", "gradcampp"): "INCONCLUSIVE"}, "PASS")
    checks = verdict_check("honest", one_inconclusive, CAM_METHODS, POSITION_VARYING, "PASS")
    assert [c["passed"] for c in checks] == [True, False]
    assert "Effusion INCONCLUSIVE" in str(checks[1]["detail"])
    missing = good[good["pathology"] != "Pneumothorax"]
    assert not any(c["passed"] for c in verdict_check("honest", missing, CAM_METHODS,
                                                       POSITION_VARYING, "PASS"))
    assert not verdict_check("random", good, METHODS, POSITION_VARYING, "FAIL")[0]["passed"]


def test_marker_check_needs_a_decisive_fraction_either_way() -> None:
    assert marker_check("shortcut", 5, 5, on_marker=True)["passed"]
    assert not marker_check("shortcut", 3, 5, on_marker=True)["passed"]  # CI straddles 0.5
    assert not marker_check("shortcut", 0, 0, on_marker=True)["passed"]
    assert marker_check("honest", 0, 5, on_marker=False)["passed"]
    assert not marker_check("honest", 0, 3, on_marker=False)["passed"]  # upper bound 0.56
    assert not marker_check("honest", 5, 5, on_marker=False)["passed"]


def test_randomization_check_needs_a_drop_over_enough_maps() -> None:
    def images(values: list[float]) -> pd.DataFrame:
        return pd.DataFrame({"method": "gradcam", "randomization_final_spearman_abs": values})

    assert randomization_check("honest", images([0.2] * MIN_RANDOMIZATION_MAPS))["passed"]
    assert not randomization_check("honest",
                                   images([0.2] * (MIN_RANDOMIZATION_MAPS - 1)))["passed"]
    assert not randomization_check("honest", images([0.7] * MIN_RANDOMIZATION_MAPS))["passed"]
    assert not randomization_check("honest", None)["passed"]


def test_auroc_check_both_ways() -> None:
    assert auroc_check("shortcut", {"Mass": 0.99})["passed"]
    assert not auroc_check("shortcut", {"Mass": 0.6})["passed"]
    assert not auroc_check("shortcut", {})["passed"]


def test_marker_fraction_counts_maps_whose_maximum_is_on_the_marker(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", marker_hits=3, mass_maps=8)
    assert marker_fraction(run, MARKER) == (3, 8)


def test_expected_verdicts() -> None:
    assert expected_verdict("honest", "Mass", "gradcam") == "PASS"
    assert expected_verdict("honest", "Nodule", "gradcam") == ""
    assert expected_verdict("honest", "Mass", "integrated_gradients") == ""
    assert expected_verdict("shortcut", "Mass", "gradcampp") == "FAIL"
    assert expected_verdict("shortcut", "Effusion", "gradcam") == ""
    assert expected_verdict("random", "Effusion", "integrated_gradients") == "FAIL"
    assert expected_verdict("random", "Mass", "centre_prior") == ""


# ---- the whole calibration on crafted runs: the right runs pass, swapped ones fail -----------


@pytest.fixture
def reference_runs(tmp_path: Path) -> dict[str, Path]:
    shortcut_verdicts = {("Mass", m): "FAIL" for m in METHODS}
    return {
        "honest": make_run(tmp_path / "honest", default="PASS", marker_hits=0),
        "shortcut": make_run(tmp_path / "shortcut", shortcut_verdicts, default="PASS",
                             marker_hits=8),
        "random": make_run(tmp_path / "random", default="FAIL", randomization=[0.9] * 5,
                           mass_auroc_high=False),
        "random2": make_run(tmp_path / "random2", default="FAIL", randomization=[0.9] * 5,
                            mass_auroc_high=False),
    }


def test_calibration_passes_with_the_right_runs(reference_runs) -> None:
    runs = {k: reference_runs[k] for k in ("honest", "shortcut", "random")}
    result = calibrate(runs, marker_box=MARKER)
    assert result.passed, result.checks_table().to_string()
    expected = result.table[result.table["expected"] != ""]
    assert (expected["verdict"] == expected["expected"]).all()


@pytest.mark.parametrize("swap", [{"honest": "random2"}, {"honest": "shortcut"},
                                  {"shortcut": "honest"}, {"random": "honest"}])
def test_calibration_fails_when_a_run_is_given_as_another_model(reference_runs, swap) -> None:
    runs = {k: reference_runs[swap.get(k, k)] for k in ("honest", "shortcut", "random")}
    result = calibrate(runs, marker_box=MARKER)
    assert not result.passed
    failed = result.checks_table().query("not passed")
    assert set(failed["model"]) >= set(swap), failed.to_string()


def test_calibration_fails_when_the_honest_model_has_one_inconclusive_row(tmp_path) -> None:
    runs = {"honest": make_run(tmp_path / "h", {("Pneumothorax", "gradcampp"): "INCONCLUSIVE"}),
            "shortcut": make_run(tmp_path / "s", {("Mass", m): "FAIL" for m in METHODS},
                                 marker_hits=8),
            "random": make_run(tmp_path / "r", default="FAIL")}
    result = calibrate(runs, marker_box=MARKER)
    failed = result.checks_table().query("not passed")
    assert list(failed["check"]) == ["gradcampp localization PASS on Mass, Effusion, "
                                     "Pneumothorax"]
