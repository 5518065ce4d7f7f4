"""Calibration of the instrument on the phantom: does the audit tell the reference models apart?

Three runs on the same phantom test set (marker present exactly when a Mass is):
- **honest**: pointing hit rate and mean IoU above the random model's CI and above the
  centre-prior baseline, Grad-CAM randomization similarity dropping;
- **shortcut**: high AUROC on the shortcut finding, but localization FAIL and maps on the marker;
- **random**: FAIL everywhere.
The check reads only finished run directories (no recomputation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from audit.metrics.aggregation import aggregate_per_pathology, wilson_interval
from audit.store.rundir import SavedMaps, read_table
from audit.store.rundir import read_run_json as load_run

POSITION_VARYING = ("Mass", "Effusion", "Pneumothorax")
SHORTCUT_FINDING = "Mass"
CHECK_METHOD = "gradcam"
AUROC_HIGH = 0.9
RANDOMIZATION_DROP = 0.5  # final |Spearman| of the fully randomized cascade must fall below
MARKER_FRACTION = 0.5
RANDOM_POINTING_FAIL = 0.5  # the demo's acceptance criterion: pointing rate >= 0.5


@dataclass
class CalibrationResult:
    table: pd.DataFrame
    checks: list[dict[str, object]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(bool(c["passed"]) for c in self.checks)

    def checks_table(self) -> pd.DataFrame:
        return pd.DataFrame(self.checks, columns=["model", "check", "passed", "detail"])


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


def _pooled(boxes: pd.DataFrame, method: str, findings: tuple[str, ...], seed: int) -> dict:
    subset = boxes[(boxes["method"] == method) & boxes["model_finding"].isin(findings)].copy()
    subset["pathology"] = "pooled"
    if subset.empty:
        return {}
    return aggregate_per_pathology(subset, seed=seed).iloc[0].to_dict()


def calibration_table(runs: dict[str, Path]) -> pd.DataFrame:
    """Per model, finding and method: AUROC, pointing rate (CI), mean IoU (CI), randomization."""
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
            rows.append(
                {
                    "model": kind,
                    "finding": finding,
                    "method": method,
                    "kind": record["kind"],
                    "n": record["n"],
                    "auroc": aurocs.get(finding, np.nan),
                    "pointing_rate": record["pointing_rate"],
                    "pointing_lo": record["pointing_lo"],
                    "pointing_hi": record["pointing_hi"],
                    "iou_mean": record["iou_mean"],
                    "iou_mean_lo": record["iou_mean_lo"],
                    "iou_mean_hi": record["iou_mean_hi"],
                    "randomization_spearman_abs": randomization,
                    "verdict": record["verdict"],
                }
            )
    return pd.DataFrame(rows)


def marker_fraction(
    run_dir: Path,
    marker_box: tuple[float, float, float, float],
    finding: str = SHORTCUT_FINDING,
    method: str = CHECK_METHOD,
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


def calibrate(
    runs: dict[str, Path],
    marker_box: tuple[float, float, float, float] | None = None,
    seed: int = 0,
) -> CalibrationResult:
    """Judge the three reference runs (`honest`, `shortcut`, `random`)."""
    missing = {"honest", "shortcut", "random"} - set(runs)
    if missing:
        raise ValueError(
            f"calibration needs runs of the honest, shortcut and random models; "
            f"missing {sorted(missing)}"
        )
    table = calibration_table(runs)
    result = CalibrationResult(table=table)
    boxes = {kind: read_table(path, "boxes") for kind, path in runs.items()}
    for kind, frame in boxes.items():
        if frame is None or frame.empty:
            raise ValueError(f"run of the {kind} model has no scored boxes")

    honest = _pooled(boxes["honest"], CHECK_METHOD, POSITION_VARYING, seed)
    random_model = _pooled(boxes["random"], CHECK_METHOD, POSITION_VARYING, seed)
    prior = _pooled(boxes["honest"], "centre_prior", POSITION_VARYING, seed)

    def check(model: str, name: str, passed: bool, detail: str) -> None:
        result.checks.append(
            {"model": model, "check": name, "passed": bool(passed), "detail": detail}
        )

    for metric, lo_hi in (("pointing_rate", "pointing_hi"), ("iou_mean", "iou_mean_hi")):
        ok = bool(honest) and bool(random_model) and honest[metric] > random_model[lo_hi]
        check(
            "honest",
            f"{metric} above the random model's CI",
            ok,
            f"honest {honest.get(metric, np.nan):.3f} vs random CI upper "
            f"{random_model.get(lo_hi, np.nan):.3f} (Grad-CAM, {', '.join(POSITION_VARYING)})",
        )
        if prior:
            ok = honest[metric] > prior[metric]
            check(
                "honest",
                f"{metric} above the centre-prior baseline",
                ok,
                f"honest {honest[metric]:.3f} vs centre prior {prior[metric]:.3f}",
            )
    honest_images = read_table(runs["honest"], "images")
    values = pd.Series(dtype=float)
    if honest_images is not None and "randomization_final_spearman_abs" in honest_images:
        values = honest_images.loc[
            honest_images["method"] == CHECK_METHOD, "randomization_final_spearman_abs"
        ].dropna()
    check(
        "honest",
        "Grad-CAM similarity drops under cascading randomization",
        len(values) > 0 and float(values.mean()) < RANDOMIZATION_DROP,
        f"mean final |Spearman| {values.mean() if len(values) else float('nan'):.3f} "
        f"(< {RANDOMIZATION_DROP}) over {len(values)} maps",
    )

    shortcut_auroc = auroc_per_finding(runs["shortcut"]).get(SHORTCUT_FINDING, np.nan)
    check(
        "shortcut",
        f"{SHORTCUT_FINDING} AUROC high",
        shortcut_auroc >= AUROC_HIGH,
        f"AUROC {shortcut_auroc:.3f} (>= {AUROC_HIGH})",
    )
    per_short = read_table(runs["shortcut"], "per_pathology")
    row = per_short[
        (per_short["pathology"] == SHORTCUT_FINDING) & (per_short["method"] == CHECK_METHOD)
    ]
    verdict = row["verdict"].iloc[0] if len(row) else ""
    check(
        "shortcut",
        f"{SHORTCUT_FINDING} localization FAIL",
        verdict == "FAIL",
        f"verdict {verdict or 'none'}; pointing rate "
        f"{row['pointing_rate'].iloc[0] if len(row) else float('nan'):.3f}",
    )
    if marker_box is not None:
        hits, total = marker_fraction(runs["shortcut"], marker_box)
        lo, hi = wilson_interval(hits, total) if total else (np.nan, np.nan)
        check(
            "shortcut",
            "maps on the marker",
            total > 0 and hits / total >= MARKER_FRACTION,
            f"{hits}/{total} {SHORTCUT_FINDING} maxima on the marker (CI {lo:.2f}–{hi:.2f})",
        )

    # Judged on the pooled position-varying findings per method: with a handful of boxes per
    # finding, one row of a random model passes a 0.5 pointing criterion by chance too often.
    random_methods = sorted(
        m
        for m in boxes["random"]["method"].unique()
        if m not in ("random", "centre_prior", "average_box")
    )
    rates = {m: _pooled(boxes["random"], m, POSITION_VARYING, seed).get("pointing_rate", np.nan)
             for m in random_methods}
    failed = [bool(np.isfinite(r) and r < RANDOM_POINTING_FAIL) for r in rates.values()]
    details = ", ".join(f"{m} {r:.2f}" for m, r in rates.items())
    check(
        "random",
        f"pointing rate FAIL (< {RANDOM_POINTING_FAIL}) for every method, pooled over "
        f"{', '.join(POSITION_VARYING)}",
        bool(failed) and all(failed),
        details,
    )
    return result


def run_label(run_dir: Path) -> str:
    run = load_run(run_dir)
    return f"{run['model']['name']} ({run['model']['fingerprint'][:12]})"
