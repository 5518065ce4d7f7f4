"""Build a small synthetic-but-valid run directory (the layout of docs/interfaces.md).

Everything is random but seeded, so tests of the report (and of anything else that reads a run
directory) do not depend on the rest of the pipeline. The numbers are made up; the shapes, column
names, file names and key formats are the contract that `audit/store/rundir.py` defines:

    run.json, boxes.parquet + boxes.csv, images.parquet, curves.parquet,
    per_pathology.csv + per_pathology.json, paired.csv, rejects.csv,
    thumbs/<thumbnail_name(image_key)> (grayscale PNG, 256 px max side),
    maps/<method>.npz (keys "<image_key>|<finding>"),
    average_maps.npz ("<method>|<finding>", "expert|<finding>").

Usage::

    from report_fixtures import build_run_dir   # tests/ is on sys.path under pytest
    run_dir = build_run_dir(tmp_path / "run", n_boxes=40)
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from audit.metrics.criteria import evaluate_criteria
from audit.protocol import DEFAULT_CRITERIA
from audit.store.rundir import table_records, thumbnail_name

# NIH ChestX-ray14 box counts per finding (984 boxes in all).
NIH_BOX_COUNTS = {
    "Atelectasis": 180,
    "Cardiomegaly": 146,
    "Effusion": 153,
    "Infiltrate": 123,
    "Mass": 85,
    "Nodule": 79,
    "Pneumonia": 120,
    "Pneumothorax": 98,
}
METHODS = ("gradcam", "gradcampp", "integrated_gradients")
BASELINES = ("random", "centre_prior", "average_box")
THRESHOLDS = (0.1, 0.25, 0.5)
RANDOMIZATION_BLOCKS = (
    "original",
    "classifier",
    "features.norm5",
    "features.denseblock4",
    "features.transition3",
    "features.denseblock3",
    "features.transition2",
    "features.denseblock2",
    "features.transition1",
    "features.denseblock1",
    "features.conv0",
)
ORIGINAL_SIZE = 1024
MAP_SIZE = 224


def model_finding(nih_name: str) -> str:
    return "Infiltration" if nih_name == "Infiltrate" else nih_name


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_mean_ci(values: np.ndarray, rng: np.random.Generator, reps: int = 400):
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return (math.nan, math.nan)
    idx = rng.integers(0, values.size, size=(reps, values.size))
    means = values[idx].mean(axis=1)
    return (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def _split_counts(n_boxes: int, findings: list[str]) -> dict[str, int]:
    weights = np.array([NIH_BOX_COUNTS.get(f, 100) for f in findings], dtype=float)
    raw = weights / weights.sum() * n_boxes
    counts = np.floor(raw).astype(int)
    counts = np.maximum(counts, 1)
    while counts.sum() < n_boxes:
        counts[int(np.argmax(raw - counts))] += 1
    while counts.sum() > n_boxes:
        counts[int(np.argmax(counts))] -= 1
    return dict(zip(findings, counts.tolist(), strict=True))


def thumb_name(image_key: str) -> str:
    """File name of an image's thumbnail under thumbs/ (as the run writer names it)."""
    return thumbnail_name(image_key)


def _smooth_field(rng: np.random.Generator, size: int, coarse: int = 8) -> np.ndarray:
    low = rng.random((coarse, coarse)).astype(np.float32)
    img = Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


_CHEST_CACHE: dict[int, np.ndarray] = {}


def _chest_base(size: int) -> np.ndarray:
    if size not in _CHEST_CACHE:
        yy, xx = np.mgrid[0:size, 0:size] / size
        body = 0.75 - 0.35 * ((xx - 0.5) ** 2 * 3)
        lungs = np.exp(-(((xx - 0.32) / 0.13) ** 2 + ((yy - 0.48) / 0.25) ** 2)) + np.exp(
            -(((xx - 0.68) / 0.13) ** 2 + ((yy - 0.48) / 0.25) ** 2)
        )
        _CHEST_CACHE[size] = (body - 0.45 * lungs).astype(np.float32)
    return _CHEST_CACHE[size]


def _synthetic_xray(rng: np.random.Generator, size: int = 256) -> Image.Image:
    """A smooth chest-like picture: two dark lung fields in a bright body, plus texture."""
    img = _chest_base(size) + 0.15 * _smooth_field(rng, size)
    img += 0.02 * rng.standard_normal((size, size), dtype=np.float32)
    img = np.clip(img, 0, 1)
    return Image.fromarray((img * 255).astype(np.uint8), mode="L")


def _blob_map(rng: np.random.Generator, centre_xy: tuple[float, float], sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[0:MAP_SIZE, 0:MAP_SIZE] + 0.5
    cx, cy = centre_xy
    m = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2)))
    m += 0.15 * _smooth_field(rng, MAP_SIZE, 6)
    return (m / m.max()).astype(np.float16)


def add_thumbnails(root: Path, image_keys: Iterable[str], seed: int = 0) -> None:
    """Write thumbs/<image_key> (smooth synthetic chest-like PNGs, 256 px) for these keys."""
    rng = np.random.default_rng(seed + 1000)
    (Path(root) / "thumbs").mkdir(exist_ok=True)
    for key in dict.fromkeys(image_keys):
        _synthetic_xray(rng).save(Path(root) / "thumbs" / thumb_name(key), compress_level=1)


def add_maps(root: Path, pairs: Iterable[tuple[str, str]], methods: Iterable[str] = METHODS,
             seed: int = 0) -> None:
    """Write maps/<method>.npz with a blob near the first box of each (image_key, finding)."""
    root = Path(root)
    rng = np.random.default_rng(seed + 2000)
    boxes = pd.read_parquet(root / "boxes.parquet",
                            columns=["image_key", "finding", "box_x", "box_y", "box_w", "box_h"])
    s = MAP_SIZE / ORIGINAL_SIZE
    centre = {}
    for r in boxes.itertuples(index=False):
        centre.setdefault((r.image_key, r.finding),
                          ((r.box_x + r.box_w / 2) * s, (r.box_y + r.box_h / 2) * s))
    (root / "maps").mkdir(exist_ok=True)
    pairs = [p for p in dict.fromkeys(pairs) if p in centre]
    for method in methods:
        arrays = {}
        for key, finding in pairs:
            cx, cy = centre[(key, finding)]
            if method == "integrated_gradients":
                cx, cy = cx + rng.normal(0, 30), cy + rng.normal(0, 30)
            arrays[f"{key}|{finding}"] = _blob_map(rng, (cx, cy), 25.0)
        np.savez_compressed(root / "maps" / f"{method}.npz", **arrays)


def build_run_dir(
    root: Path,
    *,
    n_boxes: int = 40,
    findings: Iterable[str] | None = None,
    methods: Iterable[str] = METHODS,
    baselines: Iterable[str] = BASELINES,
    seed: int = 0,
    run_id: str | None = None,
    model_name: str = "densenet121-res224-all",
    published: bool = False,
    with_boxes: bool = True,
    with_images: bool = True,
    with_curves: bool = True,
    with_paired: bool = True,
    with_rejects: bool = True,
    with_thumbs: bool = True,
    with_maps: bool = True,
    with_average_maps: bool = True,
    maps_for: Iterable[tuple[str, str]] | None = None,
    thumbs_for: Iterable[str] | None = None,
    curve_images: int = 4,
    special_image_key: str | None = None,
    special_finding: str | None = None,
    run_json_extra: dict | None = None,
    dataset_extra: dict | None = None,
    quality_shift: float = 0.0,
) -> Path:
    """Write a complete run directory under ``root`` and return it.

    ``maps_for``: only write maps for these (image_key, finding) pairs (default: all when
    ``with_maps``); ``thumbs_for``: only write thumbnails of these image keys (default: all when
    ``with_thumbs``). ``special_image_key`` / ``special_finding``: use this string as the first
    image's key / as one finding's label (for escaping tests). ``quality_shift`` moves every
    method's IoU and pointing rate (to fake a "previous run" that differs).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    findings = list(findings) if findings is not None else list(NIH_BOX_COUNTS)
    if special_finding is not None:
        findings = findings[:-1] + [special_finding] if len(findings) > 1 else [special_finding]
    methods = list(methods)
    baselines = list(baselines)
    all_methods = methods + baselines
    run_id = run_id or f"run-{seed:04d}-synthetic"

    # ---- images and boxes (original 1024 frame) -------------------------------------------
    counts = _split_counts(n_boxes, findings)
    box_rows: list[dict] = []
    image_counter = 0
    prev_key = None
    for finding in findings:
        for _ in range(counts[finding]):
            if prev_key is not None and rng.random() < 0.1:
                key = prev_key  # a second box on the same image (another or the same finding)
            else:
                image_counter += 1
                key = f"{image_counter:08d}_{int(rng.integers(0, 20)):03d}.png"
                if image_counter == 1 and special_image_key is not None:
                    key = special_image_key
            prev_key = key
            w = float(rng.uniform(60, 420))
            h = float(rng.uniform(60, 420))
            x = float(rng.uniform(0, ORIGINAL_SIZE - w))
            y = float(rng.uniform(0, ORIGINAL_SIZE - h))
            box_rows.append(dict(image_key=key, finding=finding, box_x=x, box_y=y, box_w=w,
                                 box_h=h))
    base = pd.DataFrame(box_rows)
    base["box_index"] = base.groupby(["image_key", "finding"]).cumcount()
    base["sha256"] = [
        hashlib.sha256(f"{seed}:{k}".encode()).hexdigest() for k in base["image_key"]
    ]
    base["model_finding"] = base["finding"].map(model_finding)
    image_keys = list(dict.fromkeys(base["image_key"]))

    quality = {"gradcam": 0.35, "gradcampp": 0.32, "integrated_gradients": 0.18,
               "random": 0.08, "centre_prior": 0.15, "average_box": 0.2}
    rows = []
    probability = {(k, f): float(rng.beta(2, 2)) for k, f in zip(base.image_key, base.finding,
                                                                   strict=True)}
    for method in all_methods:
        q = float(np.clip(quality.get(method, 0.2) + quality_shift, 0.01, 0.95))
        for rec in base.itertuples(index=False):
            iou = float(np.clip(rng.beta(1 + 6 * q, 6 * (1 - q) + 1), 0, 1))
            iobb = float(min(1.0, iou * rng.uniform(1.0, 2.2)))
            coverage = float(min(1.0, 1.7 * iou))  # no draw: the seeded sequence is unchanged
            empty = rng.random() < 0.01
            if empty:
                iou, iobb, coverage = 0.0, 0.0, 0.0
                pred = (math.nan,) * 4
            else:
                pw = rec.box_w * rng.uniform(0.6, 1.6)
                ph = rec.box_h * rng.uniform(0.6, 1.6)
                px = float(np.clip(rec.box_x + rng.normal(0, 60), 0, ORIGINAL_SIZE - pw))
                py = float(np.clip(rec.box_y + rng.normal(0, 60), 0, ORIGINAL_SIZE - ph))
                pred = (px, py, float(pw), float(ph))
            p = probability[(rec.image_key, rec.finding)]
            row = dict(
                run_id=run_id,
                image_key=rec.image_key,
                sha256=rec.sha256,
                finding=rec.finding,
                model_finding=rec.model_finding,
                box_index=int(rec.box_index),
                box_x=rec.box_x,
                box_y=rec.box_y,
                box_w=rec.box_w,
                box_h=rec.box_h,
                method=method,
                probability=p,
                logit=float(math.log(p / (1 - p))),
                iou=iou,
                iobb=iobb,
                coverage=coverage,
                pointing_hit=bool(rng.random() < min(0.98, q + 0.3)),
                pred_x=pred[0],
                pred_y=pred[1],
                pred_w=pred[2],
                pred_h=pred[3],
            )
            for t in THRESHOLDS:
                row[f"iou_hit_{t}"] = bool(iou >= t)
            for t in THRESHOLDS:
                row[f"iobb_hit_{t}"] = bool(iobb >= t)
            row["threshold"] = 0.15
            rows.append(row)
    boxes = pd.DataFrame(rows)
    # as the run writer (audit/run/): the pathology (model finding name) and the best box per
    # (image, finding, method); aggregates use the best-matching rows only
    boxes["pathology"] = boxes["model_finding"]
    order = boxes.sort_values("iou", ascending=False, kind="mergesort")
    best_idx = order.groupby(["image_key", "finding", "method"], sort=False).head(1).index
    boxes["best_match"] = boxes.index.isin(best_idx)
    scored = boxes[boxes["best_match"]]
    if with_boxes:
        boxes.to_parquet(root / "boxes.parquet", index=False)
        boxes.to_csv(root / "boxes.csv", index=False)

    # ---- per pathology aggregate ------------------------------------------------------------
    agg_rows = []
    for finding in findings:
        for method in all_methods:
            sub = scored[(scored.finding == finding) & (scored.method == method)]
            n = len(sub)
            iou = sub["iou"].to_numpy(float)
            lo, hi = bootstrap_mean_ci(iou, rng)
            med_lo, med_hi = (float(np.quantile(iou, 0.3)), float(np.quantile(iou, 0.7))) \
                if n else (math.nan, math.nan)
            k = int(sub["pointing_hit"].sum())
            plo, phi = wilson_interval(k, n)
            kind = "baseline" if method in baselines else "method"
            row = dict(
                pathology=model_finding(finding),
                method=method,
                kind=kind,
                n=n,
                iou_mean=float(iou.mean()) if n else math.nan,
                iou_mean_lo=lo,
                iou_mean_hi=hi,
                iou_median=float(np.median(iou)) if n else math.nan,
                iou_median_lo=med_lo,
                iou_median_hi=med_hi,
                iobb_mean=float(sub["iobb"].mean()) if n else math.nan,
                coverage_mean=float(sub["coverage"].mean()) if n else math.nan,
                pointing_rate=k / n if n else math.nan,
                pointing_lo=plo,
                pointing_hi=phi,
            )
            for prefix in ("iou_hit", "iobb_hit"):
                for t in THRESHOLDS:
                    kk = int(sub[f"{prefix}_{t}"].sum())
                    r_lo, r_hi = wilson_interval(kk, n)
                    row[f"{prefix}_{t}_rate"] = kk / n if n else math.nan
                    row[f"{prefix}_{t}_lo"] = r_lo
                    row[f"{prefix}_{t}_hi"] = r_hi
            agg_rows.append(row)
    per_pathology = pd.DataFrame(agg_rows)

    # ---- paired comparisons -----------------------------------------------------------------
    paired = None
    if with_paired:
        prow = []

        def pair(finding: str, a: str, b: str, metric: str, p_boot: float) -> dict:
            sa = scored[(scored.finding == finding) & (scored.method == a)][metric]
            sb = scored[(scored.finding == finding) & (scored.method == b)][metric]
            ma, mb = float(sa.astype(float).mean()), float(sb.astype(float).mean())
            d = ma - mb
            return dict(pathology=model_finding(finding), method_a=a, method_b=b, metric=metric,
                        n_pairs=len(sa), mean_a=ma, mean_b=mb, mean_diff=d, diff_lo=d - 0.08,
                        diff_hi=d + 0.08, p_boot=p_boot)

        for finding in findings:
            for i, a in enumerate(methods):
                for b in methods[i + 1 :] + baselines[:1]:
                    for metric in ("iou", "pointing_hit"):
                        prow.append(pair(finding, a, b, metric, float(rng.uniform(0, 0.2))))
                for b in baselines[1:]:  # no draw: the seeded sequence is unchanged
                    for metric in ("iou", "pointing_hit"):
                        prow.append(pair(finding, a, b, metric, 0.05))
        paired = pd.DataFrame(prow)
        paired.to_csv(root / "paired.csv", index=False)

    # ---- verdicts by the run's own rules (audit/metrics/criteria.py), default criteria ------
    per_pathology = evaluate_criteria(per_pathology, DEFAULT_CRITERIA, paired)
    per_pathology.to_csv(root / "per_pathology.csv", index=False)
    records = table_records(per_pathology)
    (root / "per_pathology.json").write_text(json.dumps(records, indent=1))

    # ---- per image tables -------------------------------------------------------------------
    pairs = list(dict.fromkeys(zip(base.image_key, base.finding, strict=True)))
    if with_images:
        irows = []
        for method in all_methods:
            cam = method in methods
            for key, finding in pairs:
                p_img = probability[(key, finding)]
                ig = method == "integrated_gradients"
                irows.append(dict(
                    image_key=key, finding=finding, method=method,
                    probability=p_img, logit=float(math.log(p_img / (1 - p_img))),
                    completeness_gap=float(rng.normal(0, 0.05)) if ig else math.nan,
                    delta_f=float(rng.uniform(1, 4)) if ig else math.nan,
                    determinism_max_abs_diff=0.0 if cam else math.nan,
                    noise_ssim=float(rng.uniform(0.7, 0.99)) if cam else math.nan,
                    noise_spearman=float(rng.uniform(0.6, 0.99)) if cam else math.nan,
                    shift_ssim=float(rng.uniform(0.6, 0.95)) if cam else math.nan,
                    shift_spearman=float(rng.uniform(0.5, 0.95)) if cam else math.nan,
                    shift_delta_iou=float(rng.normal(0, 0.05)) if cam else math.nan,
                    fidelity_deletion_auc=float(rng.uniform(0.1, 0.4)),
                    fidelity_insertion_auc=float(rng.uniform(0.4, 0.8)),
                    fidelity_deletion_auc_random=float(rng.uniform(0.3, 0.5)),
                    fidelity_insertion_auc_random=float(rng.uniform(0.3, 0.5)),
                    randomization_final_spearman_abs=float(rng.uniform(0, 0.3)) if cam
                    else math.nan,
                ))
        pd.DataFrame(irows).to_parquet(root / "images.parquet", index=False)

    if with_curves:
        crows = []
        sel = pairs[:curve_images]
        n_steps = len(RANDOMIZATION_BLOCKS) - 1
        for method in methods:
            decay = {"gradcam": 0.9, "gradcampp": 0.85,
                     "integrated_gradients": 0.3}.get(method, 0.5)
            for key, finding in sel:
                for family in ("randomization_cascade", "randomization_independent"):
                    for step, label in enumerate(RANDOMIZATION_BLOCKS):
                        frac = step / n_steps if family == "randomization_cascade" else (
                            0.0 if step == 0 else 1.0 / n_steps)
                        for metric in ("spearman", "spearman_abs", "ssim", "hog"):
                            v = 1.0 if step == 0 else float(np.clip(
                                1 - decay * (frac if family == "randomization_cascade" else 0.5)
                                + rng.normal(0, 0.05), -1, 1))
                            crows.append(dict(image_key=key, finding=finding, method=method,
                                              family=family, step=step, label=label, x=frac,
                                              metric=metric, value=v))
                for family in ("deletion", "insertion", "deletion_random", "insertion_random"):
                    p0 = probability[(key, finding)]
                    for step in range(51):
                        x = step / 50
                        if family == "deletion":
                            v = p0 * math.exp(-4 * x)
                        elif family == "insertion":
                            v = p0 * (1 - math.exp(-4 * x))
                        elif family == "deletion_random":
                            v = p0 * (1 - 0.7 * x)
                        else:
                            v = p0 * 0.7 * x
                        crows.append(dict(image_key=key, finding=finding, method=method,
                                          family=family, step=step, label="", x=x,
                                          metric="probability",
                                          value=float(v + rng.normal(0, 0.01))))
        pd.DataFrame(crows).to_parquet(root / "curves.parquet", index=False)

    # ---- rejects ------------------------------------------------------------------------------
    if with_rejects:
        pd.DataFrame([
            dict(path="broken/00099999_000.png", image_key="00099999_000.png", finding="Mass",
                 reason="cannot decode PNG: truncated file"),
            dict(path="dicom/scan.dcm", image_key="scan.dcm", finding="",
                 reason="unsupported transfer syntax"),
        ]).to_csv(root / "rejects.csv", index=False)

    # ---- thumbnails, maps, average maps -------------------------------------------------------
    if with_thumbs:
        add_thumbnails(root, thumbs_for if thumbs_for is not None else image_keys, seed=seed)
    if with_maps and with_boxes:
        add_maps(root, maps_for if maps_for is not None else pairs, methods, seed=seed)

    if with_average_maps:
        avg = {}
        yy, xx = np.mgrid[0:MAP_SIZE, 0:MAP_SIZE] + 0.5
        s = MAP_SIZE / ORIGINAL_SIZE
        for finding in findings:
            sub = base[base.finding == finding]
            ind = np.zeros((MAP_SIZE, MAP_SIZE), np.float32)
            for rec in sub.itertuples(index=False):
                ind += ((xx >= rec.box_x * s) & (xx <= (rec.box_x + rec.box_w) * s)
                        & (yy >= rec.box_y * s) & (yy <= (rec.box_y + rec.box_h) * s))
            avg[f"expert|{finding}"] = (ind / max(len(sub), 1)).astype(np.float32)
            cx = float((sub.box_x + sub.box_w / 2).mean() * s)
            cy = float((sub.box_y + sub.box_h / 2).mean() * s)
            for method in all_methods:
                if method == "centre_prior":
                    m = _blob_map(rng, (112, 112), 60)
                elif method == "random":
                    m = _smooth_field(rng, MAP_SIZE, 16)
                else:
                    m = _blob_map(rng, (cx, cy), 45)
                avg[f"{method}|{finding}"] = np.asarray(m, np.float32)
        np.savez(root / "average_maps.npz", **avg)

    # ---- run.json -----------------------------------------------------------------------------
    run = {
        "run_id": run_id,
        "started_at": "2025-11-20T02:00:00+00:00",
        "finished_at": "2025-11-20T02:41:13+00:00",
        "status": "finished",
        "model": {
            "name": model_name,
            "fingerprint": format(seed, "064x").replace("0", "a", 8),
            "source": "weights" if published else "checkpoint",
            "seed": seed,
            "published": published,
        },
        "dataset": {
            "name": "nih_bbox_synthetic",
            "manifest_path": "data_manifests/nih_bbox_synthetic.csv",
            "manifest_sha256": "b" * 64,
            "n_images": len(image_keys),
            "n_boxes": len(base),
            "images_dir": "/data/nih/images",
            **(dataset_extra or {}),
        },
        "settings": {
            "methods": methods,
            "baselines": baselines,
            "metrics": ["localization", "repeatability", "randomization", "fidelity"],
            "threshold": 0.15,
            "threshold_sweep": [0.05, 0.95, 0.05],
            "pointing_tolerance_px": 15,
            "ig": {"steps": 50, "baseline": "black"},
            "fidelity": {"step_fraction": 0.02, "baseline": "blur"},
            "seeds": {"bootstrap": 0, "random_baseline": 1},
            "sampling": {"repeatability_images": 50, "randomization_images": curve_images},
            "batch_size": 16,
        },
        "sampled": {"randomization": curve_images, "fidelity": curve_images},
        "versions": {"python": "3.11.2", "torch": "2.14.1", "torchxrayvision": "1.3.4",
                     "numpy": np.__version__, "cxr-audit": "0.1.0"},
        "device": "cpu",
        "git_commit": "a8309e8" + "0" * 33,
        "host": "audit-host",
        "timings": {"ingest": 3.2, "explain": 812.5, "score": 120.25, "store": 1.5},
        "acceptance_criteria": [dict(c) for c in DEFAULT_CRITERIA],
        "target_layer": "features.norm5 (rectified: ReLU(norm5) as pooled)",
    }
    if run_json_extra:
        run.update(run_json_extra)
    (root / "run.json").write_text(json.dumps(run, indent=2))
    return root
