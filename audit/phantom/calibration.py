"""Calibration of the instrument on the phantom: does the audit tell the reference models apart?

Three runs of the audit on **one** phantom test set (the demo's: the laterality marker accompanies
every Mass and the Masses are visible, see docs/phantom.md), each judged by the run's own
per-pathology verdicts (its acceptance criteria, judged by CI) and by what its saved maps show:

- **honest**: localization PASS for Grad-CAM and Grad-CAM++ on every position-varying finding
  (Mass, Effusion, Pneumothorax); its Mass maxima decisively *not* on the marker; Grad-CAM
  similarity dropping under cascading randomization (mean over at least
  ``MIN_RANDOMIZATION_MAPS`` maps);
- **shortcut**: Mass AUROC high, but Mass localization FAIL for Grad-CAM and Grad-CAM++, with
  its Mass maxima decisively on the marker;
- **random**: localization FAIL for every method on every position-varying finding.

"Decisively" is by the Wilson 95 % CI of the fraction (lower bound >= 0.5 for "on", upper bound
< 0.5 for "not on"). Each check is a function of the run's tables, so it can be tested on
crafted tables (tests/test_calibration.py). The check reads finished run directories only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from audit.metrics.aggregation import wilson_interval
from audit.protocol import BASELINE_NAMES
from audit.store.rundir import SavedMaps, read_table
from audit.store.rundir import read_run_json as load_run

POSITION_VARYING = ("Mass", "Effusion", "Pneumothorax")
SHORTCUT_FINDING = "Mass"
CAM_METHODS = ("gradcam", "gradcampp")  # every expected verdict must be decisive for these
RANDOMIZATION_METHOD = "gradcam"
AUROC_HIGH = 0.9
RANDOMIZATION_DROP = 0.5  # mean final |Spearman| of the fully randomized cascade must fall below
MIN_RANDOMIZATION_MAPS = 5  # the randomization check averages at least this many maps
MARKER_FRACTION = 0.5  # "on the marker": Wilson lower bound >= this; "not on": upper bound <


@dataclass
class CalibrationResult:
    table: pd.DataFrame
    checks: list[dict[str, object]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(bool(c["passed"]) for c in self.checks)

    def checks_table(self) -> pd.DataFrame:
        return pd.DataFrame(self.checks, columns=["model", "check", "passed", "detail"])


def _check(model: str, name: str, passed: bool, detail: str) -> dict[str, object]:
    return {"model": model, "check": name, "passed": bool(passed), "detail": detail}


def auroc_per_finding(run_dir: Path) -> dict[str, float]:
    """AUROC of the model's probability per finding, over every image with a known label."""
    predictions = read_table(run_dir, "predictions")
    out: dict[str, float] = {}
    if predictions is None or predictions.empty:
        return out
    for finding, group in predictions.dropna(subset=["label"]).groupby("finding"):
        labels = group["label"].to_numpy()
        if 0 < labels.sum() < len(labels):
            out[str(finding)] = float(roc_auc_score(labels, group["probability"]))
    return out


def expected_verdict(model: str, finding: str, method: str) -> str:
    """What the calibration expects of a (model, finding, method) row ("" = no expectation)."""
    if finding not in POSITION_VARYING or method in BASELINE_NAMES:
        return ""
    if model == "honest" and method in CAM_METHODS:
        return "PASS"
    if model == "shortcut" and finding == SHORTCUT_FINDING and method in CAM_METHODS:
        return "FAIL"
    if model == "random":
        return "FAIL"
    return ""


def calibration_table(runs: dict[str, Path]) -> pd.DataFrame:
    """Per model, finding and method: n, AUROC, pointing rate (CI), mean IoU (CI),
    randomization, the run's verdict and the calibration's expected verdict."""
    rows = []
    for kind, run_dir in runs.items():
        per = read_table(run_dir, "per_pathology")
        images = read_table(run_dir, "images")
        aurocs = auroc_per_finding(run_dir)
        if per is None or per.empty:
            continue
        for record in per.to_dict("records"):
            finding, method = record["pathology"], record["method"]
            randomization = np.nan
            if images is not None and "randomization_final_spearman_abs" in images:
                sel = images[(images["finding"] == finding) & (images["method"] == method)]
                values = sel["randomization_final_spearman_abs"].dropna()
                randomization = float(values.mean()) if len(values) else np.nan
            rows.append({
                "model": kind, "finding": finding, "method": method, "kind": record["kind"],
                "n": record["n"], "auroc": aurocs.get(finding, np.nan),
                "pointing_rate": record["pointing_rate"], "pointing_lo": record["pointing_lo"],
                "pointing_hi": record["pointing_hi"], "iou_mean": record["iou_mean"],
                "iou_mean_lo": record["iou_mean_lo"], "iou_mean_hi": record["iou_mean_hi"],
                "randomization_spearman_abs": randomization, "verdict": record["verdict"],
                "expected": expected_verdict(kind, finding, method),
            })
    return pd.DataFrame(rows)


def marker_fraction(
    run_dir: Path,
    marker_box: tuple[float, float, float, float],
    finding: str = SHORTCUT_FINDING,
    method: str = "gradcam",
    tolerance_px: float = 0.0,
) -> tuple[int, int]:
    """How many of `finding`'s maps put their maximum on the marker: (hits, n).

    Needs the run's saved maps (`--save-maps`). `marker_box` is in the 1024 frame; maps are
    at model resolution, the box is scaled to it.
    """
    from audit.metrics.pointing import pointing_game_hit

    hits = total = 0
    for _image_key, map_finding, saved in SavedMaps(Path(run_dir) / "maps").all(method):
        if map_finding == finding:
            saliency = saved.astype(np.float32)
            scale = saliency.shape[-1] / 1024.0
            box = np.array([[v * scale for v in marker_box]])
            hits += int(pointing_game_hit(np.clip(saliency, 0, None), box, tolerance_px))
            total += 1
    return hits, total


# ---- the checks, each a function of a run's tables ---------------------------------------------


def _verdicts(per: pd.DataFrame | None, methods, findings) -> dict[tuple[str, str], str]:
    out = {}
    for method in methods:
        for finding in findings:
            row = pd.DataFrame() if per is None else per[
                (per["pathology"] == finding) & (per["method"] == method)]
            out[(method, finding)] = str(row["verdict"].iloc[0]) if len(row) else "missing"
    return out


def verdict_check(model: str, per: pd.DataFrame | None, methods, findings,
                  expected: str) -> list[dict[str, object]]:
    """One check per method: the run's verdict is `expected` on every one of `findings`
    (a missing row or an INCONCLUSIVE verdict fails the check)."""
    verdicts = _verdicts(per, methods, findings)
    checks = []
    for method in methods:
        got = {f: verdicts[(method, f)] for f in findings}
        checks.append(_check(
            model, f"{method} localization {expected} on {', '.join(findings)}",
            all(v == expected for v in got.values()),
            "; ".join(f"{f} {v}" for f, v in got.items())))
    return checks


def marker_check(model: str, hits: int, total: int, on_marker: bool) -> dict[str, object]:
    """The Mass maxima are decisively on (``on_marker``) or decisively not on the marker."""
    lo, hi = wilson_interval(hits, total) if total else (np.nan, np.nan)
    if on_marker:
        name, passed = "Mass maxima on the marker", total > 0 and lo >= MARKER_FRACTION
        bound = f"CI lower bound >= {MARKER_FRACTION}"
    else:
        name, passed = "Mass maxima not on the marker", total > 0 and hi < MARKER_FRACTION
        bound = f"CI upper bound < {MARKER_FRACTION}"
    return _check(model, name, passed,
                  f"{hits}/{total} on the marker (95% CI {lo:.2f}-{hi:.2f}; needs {bound})")


def randomization_check(model: str, images: pd.DataFrame | None,
                        method: str = RANDOMIZATION_METHOD) -> dict[str, object]:
    """Mean final |Spearman| of the cascade below RANDOMIZATION_DROP over at least
    MIN_RANDOMIZATION_MAPS maps."""
    values = pd.Series(dtype=float)
    if images is not None and "randomization_final_spearman_abs" in images:
        values = images.loc[images["method"] == method,
                            "randomization_final_spearman_abs"].dropna()
    mean = float(values.mean()) if len(values) else float("nan")
    return _check(
        model, f"{method} similarity drops under cascading randomization",
        len(values) >= MIN_RANDOMIZATION_MAPS and mean < RANDOMIZATION_DROP,
        f"mean final |Spearman| {mean:.3f} (< {RANDOMIZATION_DROP}) over {len(values)} maps "
        f"(at least {MIN_RANDOMIZATION_MAPS})")


def auroc_check(model: str, aurocs: dict[str, float],
                finding: str = SHORTCUT_FINDING) -> dict[str, object]:
    value = aurocs.get(finding, np.nan)
    return _check(model, f"{finding} AUROC high", bool(value >= AUROC_HIGH),
                  f"AUROC {value:.3f} (>= {AUROC_HIGH})")


def random_methods(per: pd.DataFrame | None) -> list[str]:
    """The saliency methods (not baselines) the random model's run scored."""
    if per is None or per.empty:
        return []
    return sorted(m for m in per["method"].unique() if m not in BASELINE_NAMES)


def calibrate(
    runs: dict[str, Path],
    marker_box: tuple[float, float, float, float] | None = None,
) -> CalibrationResult:
    """Judge the three reference runs (`honest`, `shortcut`, `random`) on the same test set.

    Without ``marker_box`` (1024 frame) the two marker checks are left out."""
    missing = {"honest", "shortcut", "random"} - set(runs)
    if missing:
        raise ValueError(
            f"calibration needs runs of the honest, shortcut and random models; "
            f"missing {sorted(missing)}"
        )
    result = CalibrationResult(table=calibration_table(runs))
    per = {kind: read_table(path, "per_pathology") for kind, path in runs.items()}
    for kind, frame in per.items():
        if frame is None or frame.empty:
            raise ValueError(f"run of the {kind} model has no per-pathology results")

    checks = result.checks
    checks += verdict_check("honest", per["honest"], CAM_METHODS, POSITION_VARYING, "PASS")
    if marker_box is not None:
        checks.append(marker_check("honest", *marker_fraction(runs["honest"], marker_box),
                                   on_marker=False))
    checks.append(randomization_check("honest", read_table(runs["honest"], "images")))

    checks.append(auroc_check("shortcut", auroc_per_finding(runs["shortcut"])))
    checks += verdict_check("shortcut", per["shortcut"], CAM_METHODS, (SHORTCUT_FINDING,),
                            "FAIL")
    if marker_box is not None:
        checks.append(marker_check("shortcut", *marker_fraction(runs["shortcut"], marker_box),
                                   on_marker=True))

    methods = random_methods(per["random"]) or list(CAM_METHODS)
    checks += verdict_check("random", per["random"], methods, POSITION_VARYING, "FAIL")
    return result


def run_label(run_dir: Path) -> str:
    run = load_run(run_dir)
    return f"{run['model']['name']} ({run['model']['fingerprint'][:12]})"
