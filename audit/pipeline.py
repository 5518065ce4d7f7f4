"""The audit as plain library calls: select images, explain and score a batch, assemble a run.

`flows/` wraps these functions into Prefect tasks; a notebook can call them directly.
A batch's results are written to a content-addressed folder (`batch_cache_key`), so an
interrupted run resumes from the batches already done, whatever runner or flow run computes them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from audit import __version__
from audit.config import AuditSettings
from audit.store.files import atomic_write_bytes, atomic_write_json, atomic_write_table

log = logging.getLogger("cxr_audit")

HIT_THRESHOLDS = (0.1, 0.25, 0.5)
POINTING_TOLERANCE_AT_1024 = 15.0
THUMB_SIZE = 256
BOX_COLUMNS = ["box_x", "box_y", "box_w", "box_h"]


# ---------------------------------------------------------------------------------------------
# selection


@dataclass
class Selection:
    """Which images the run audits, and which (image, finding) pairs get the costly metrics."""

    manifest: pd.DataFrame
    costly: list[tuple[str, str]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)


def select_images(manifest: pd.DataFrame, settings: AuditSettings) -> Selection:
    """Apply `--per-pathology` / `--limit` (seeded) and draw the costly-metrics sample."""
    rng_seed = int(settings.seed)
    keys = sorted(manifest["image_key"].unique())
    chosen = set(keys)
    record: dict[str, Any] = {"seed": rng_seed}
    boxed = manifest.dropna(subset=["box_x"])
    if settings.per_pathology:
        chosen = set()
        for finding, group in boxed.groupby("finding", sort=True):
            group_keys = sorted(group["image_key"].unique())
            rng = np.random.default_rng([rng_seed, _stable_int(str(finding))])
            take = min(settings.per_pathology, len(group_keys))
            picked = rng.choice(len(group_keys), size=take, replace=False)
            chosen.update(group_keys[i] for i in sorted(picked))
        record["per_pathology"] = settings.per_pathology
    if settings.limit is not None and len(chosen) > settings.limit:
        ordered = sorted(chosen)
        rng = np.random.default_rng(rng_seed)
        picked = rng.choice(len(ordered), size=settings.limit, replace=False)
        chosen = {ordered[i] for i in sorted(picked)}
        record["limit"] = settings.limit
    selected = manifest[manifest["image_key"].isin(chosen)].copy()
    selected = selected.sort_values(["image_key", "finding", "box_index"], na_position="first")
    record["images"] = sorted(chosen)

    costly: list[tuple[str, str]] = []
    costly_families = set(settings.metrics) - {"localization"}
    if costly_families and settings.costly_per_pathology > 0:
        pairs = selected.dropna(subset=["box_x"])[["image_key", "model_finding"]].drop_duplicates()
        for finding, group in pairs.groupby("model_finding", sort=True):
            options = sorted(group["image_key"].tolist())
            rng = np.random.default_rng([rng_seed, 1, _stable_int(str(finding))])
            take = min(settings.costly_per_pathology, len(options))
            picked = rng.choice(len(options), size=take, replace=False)
            costly.extend((options[i], str(finding)) for i in sorted(picked))
        if settings.costly_max_pairs is not None and len(costly) > settings.costly_max_pairs:
            rng = np.random.default_rng([rng_seed, 2])
            keep = rng.choice(len(costly), size=settings.costly_max_pairs, replace=False)
            costly = [costly[i] for i in sorted(keep)]
    record["costly_sample"] = [list(p) for p in costly]
    return Selection(manifest=selected.reset_index(drop=True), costly=costly, record=record)


def plan_batches(selection: Selection, batch_size: int) -> list[list[str]]:
    keys = sorted(selection.manifest["image_key"].unique())
    return [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]


def batch_cache_key(
    rows: pd.DataFrame,
    costly: Iterable[tuple[str, str]],
    model_fingerprint: str,
    settings: AuditSettings,
) -> str:
    """A key from content only: image bytes, boxes, model weights, settings and code version."""
    payload = {
        "images": sorted(zip(rows["image_key"], rows["sha256"], strict=True)),
        "boxes": rows[["image_key", "model_finding", *BOX_COLUMNS]].astype(str).values.tolist(),
        "costly": sorted(tuple(p) for p in costly),
        "model": model_fingerprint,
        "settings": settings.compute_key(),
        "code": __version__,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _stable_int(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


# ---------------------------------------------------------------------------------------------
# one batch


@dataclass
class LoadedImage:
    key: str
    tensor: torch.Tensor  # [1, S, S]
    thumb: np.ndarray  # uint8 thumbnail
    scale_x: float
    scale_y: float
    width: int
    height: int


def load_batch_images(
    rows: pd.DataFrame, images_root: Path, size: int
) -> tuple[list[LoadedImage], list[dict[str, str]]]:
    """Decode and preprocess each image of a batch; decode failures become rejects rows."""
    from audit.data.preprocess import nominal_range, preprocess
    from audit.data.readers import RejectedInput, read_image

    loaded: list[LoadedImage] = []
    rejects: list[dict[str, str]] = []
    for key, group in rows.groupby("image_key", sort=True):
        rel = group["path"].iloc[0]
        path = Path(images_root) / rel
        try:
            decoded = read_image(path)
        except RejectedInput as err:
            rejects.append({"path": str(rel), "image_key": str(key), "finding": "",
                            "reason": str(err)})
            continue
        except FileNotFoundError:
            rejects.append({"path": str(rel), "image_key": str(key), "finding": "",
                            "reason": "file named in the manifest is missing on disk"})
            continue
        pre = preprocess(decoded.pixels, size=size,
                         value_range=nominal_range(decoded.pixels, decoded.meta))
        loaded.append(
            LoadedImage(
                key=str(key),
                tensor=pre.tensor,
                thumb=_thumbnail(decoded.pixels),
                scale_x=float(pre.scale_x),
                scale_y=float(pre.scale_y),
                width=int(decoded.pixels.shape[1]),
                height=int(decoded.pixels.shape[0]),
            )
        )
    return loaded, rejects


def _thumbnail(pixels: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(pixels)), float(np.max(pixels))
    scaled = (pixels - lo) / (hi - lo) if hi > lo else np.zeros_like(pixels)
    img = Image.fromarray((scaled * 255).round().astype(np.uint8))
    img.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
    return np.asarray(img)


@dataclass
class BatchResult:
    boxes: pd.DataFrame
    images: pd.DataFrame
    curves: pd.DataFrame
    rejects: pd.DataFrame
    map_sums: dict[str, np.ndarray]
    map_counts: dict[str, int]


def audit_batch(
    model: Any,
    rows: pd.DataFrame,
    images_root: Path,
    settings: AuditSettings,
    costly: Iterable[tuple[str, str]],
    out_dir: Path,
) -> Path:
    """Explain and score one batch of images; write its results into `out_dir` (atomically).

    Returns `out_dir`. The folder holds `boxes.parquet`, `images.parquet`, `curves.parquet`,
    `rejects.parquet`, `map_sums.npz`, thumbnails and (with `save_maps`) the maps.
    """
    from audit.saliency import explain_all

    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)

    costly_set = {tuple(p) for p in costly}
    loaded, rejects = load_batch_images(rows, images_root, settings.image_size)
    known = set(model.pathologies) - {""}

    box_rows: list[dict[str, Any]] = []
    image_rows: list[dict[str, Any]] = []
    curve_rows: list[dict[str, Any]] = []
    map_sums: dict[str, np.ndarray] = {}
    map_counts: dict[str, int] = {}
    saved_maps: dict[str, np.ndarray] = {}
    thumbs_dir = staging / "thumbs"
    thumbs_dir.mkdir()

    # targets per image: the model findings of its boxes (or of its labels when it has none)
    targets_per_image: list[list[str]] = []
    for item in loaded:
        group = rows[rows["image_key"] == item.key]
        boxed = group.dropna(subset=["box_x"])
        wanted = sorted(boxed["model_finding"].unique()) if len(boxed) else _label_findings(group)
        missing = [f for f in wanted if f not in known]
        for name in missing:
            rejects.append({"path": str(group["path"].iloc[0]), "image_key": item.key,
                            "finding": name,
                            "reason": f"finding {name!r} is not an output of the model"})
        targets_per_image.append([f for f in wanted if f in known])
        buffer = io.BytesIO()
        Image.fromarray(item.thumb).save(buffer, format="PNG", optimize=True)
        atomic_write_bytes(thumbs_dir / f"{_safe_name(item.key)}.png", buffer.getvalue())

    prediction_rows: list[dict[str, Any]] = []
    all_logits = np.zeros((0, len(model.pathologies)))
    all_probs = all_logits
    if loaded:
        stacked = torch.stack([item.tensor for item in loaded]).to(model.device)
        with torch.inference_mode():
            all_logits = model.logits(stacked).float().cpu().numpy()
            all_probs = model.probabilities(stacked).float().cpu().numpy()
    for item, logits, probs in zip(loaded, all_logits, all_probs, strict=True):
        group = rows[rows["image_key"] == item.key]
        labelled = set(_label_findings(group)) | set(group["model_finding"].dropna())
        has_labels = bool(group["labels"].notna().any()) if "labels" in group else False
        for out_index, name in enumerate(model.pathologies):
            if not name:
                continue
            prediction_rows.append({
                "image_key": item.key, "finding": name, "logit": float(logits[out_index]),
                "probability": float(probs[out_index]),
                "label": float(name in labelled) if has_labels or name in labelled else np.nan,
            })

    method_names = list(settings.methods) + list(settings.baselines)
    for index, (item, targets) in enumerate(zip(loaded, targets_per_image, strict=True)):
        if not targets:
            continue
        x = item.tensor.unsqueeze(0).to(model.device)
        target_idx = torch.tensor([[model.finding_index(t) for t in targets]], device=model.device)
        logits, probs = all_logits[index], all_probs[index]
        results = explain_all(model, x, target_idx, method_names, **_method_options(settings))
        group = rows[rows["image_key"] == item.key]
        for k, finding in enumerate(targets):
            out_index = model.finding_index(finding)
            boxes_here = group[(group["model_finding"] == finding)].dropna(subset=["box_x"])
            boxes_model = _scale_boxes(boxes_here, item.scale_x, item.scale_y)
            for method in method_names:
                saliency = results[method].maps[0, k].detach().float().cpu().numpy()
                positive = np.clip(saliency, 0, None)
                key = f"{method}|{finding}"
                map_sums[key] = map_sums.get(key, np.zeros_like(positive, dtype=np.float64)) + (
                    positive / positive.max() if positive.max() > 0 else positive
                )
                map_counts[key] = map_counts.get(key, 0) + 1
                if settings.save_maps:
                    saved_maps[f"{method}|{item.key}|{finding}"] = saliency.astype(np.float16)
                if len(boxes_model):
                    box_rows.extend(
                        _score_boxes(item, finding, method, positive, boxes_here, boxes_model,
                                     float(probs[out_index]), float(logits[out_index]), settings)
                    )
                extras = {
                    name: float(values[0, k]) for name, values in results[method].extras.items()
                }
                image_rows.append({"image_key": item.key, "finding": finding, "method": method,
                                   "probability": float(probs[out_index]),
                                   "logit": float(logits[out_index]), **extras})
            if (item.key, finding) in costly_set:
                costly_rows, costly_curves = _costly_metrics(
                    model, item, finding, k, target_idx, boxes_model, results, settings
                )
                for row in image_rows:
                    if row["image_key"] == item.key and row["finding"] == finding:
                        row.update(costly_rows.get(row["method"], {}))
                curve_rows.extend(costly_curves)

    result_tables = {
        "boxes": pd.DataFrame(box_rows),
        "images": pd.DataFrame(image_rows),
        "curves": pd.DataFrame(curve_rows),
        "predictions": pd.DataFrame(prediction_rows),
        "rejects": pd.DataFrame(rejects, columns=["path", "image_key", "finding", "reason"]),
    }
    for name, table in result_tables.items():
        atomic_write_table(table, staging / f"{name}.parquet")
    _write_npz(staging / "map_sums.npz", map_sums)
    atomic_write_json(staging / "map_counts.json", map_counts)
    if settings.save_maps:
        _write_npz(staging / "maps.npz", saved_maps)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


def _label_findings(group: pd.DataFrame) -> list[str]:
    from audit.data.nih import to_model_finding

    labels = group["labels"].dropna()
    if not len(labels):
        return []
    names = [n for n in str(labels.iloc[0]).split("|") if n and n != "No Finding"]
    return sorted({to_model_finding(n) for n in names})


def _safe_name(key: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in key)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _method_options(settings: AuditSettings) -> dict[str, Any]:
    return {
        "ig_steps": settings.ig_steps,
        "ig_method": settings.ig_method,
        "ig_baseline": settings.ig_baseline,
        "ig_internal_batch_size": settings.ig_internal_batch_size,
        "seed": settings.seed,
    }


def _scale_boxes(boxes: pd.DataFrame, scale_x: float, scale_y: float) -> np.ndarray:
    if not len(boxes):
        return np.zeros((0, 4))
    raw = boxes[BOX_COLUMNS].to_numpy(dtype=np.float64)
    return raw * np.array([scale_x, scale_y, scale_x, scale_y])


def pointing_tolerance_px(width: int, scale_x: float) -> float:
    """15 px at the 1024 frame, expressed in map pixels (width·scale = map width)."""
    return POINTING_TOLERANCE_AT_1024 * (width * scale_x) / 1024.0


def _score_boxes(
    item: LoadedImage,
    finding: str,
    method: str,
    positive_map: np.ndarray,
    boxes_orig: pd.DataFrame,
    boxes_model: np.ndarray,
    probability: float,
    logit: float,
    settings: AuditSettings,
) -> list[dict[str, Any]]:
    from audit.metrics.localization import localize, scores_against_boxes
    from audit.metrics.pointing import pointing_game_hit

    predicted = localize(positive_map, settings.threshold)
    per_box = scores_against_boxes(predicted, boxes_model)
    best = int(np.argmax([s["iou"] for s in per_box])) if per_box else -1
    tolerance = pointing_tolerance_px(item.width, item.scale_x)
    rows = []
    for i, (record, scores) in enumerate(zip(boxes_orig.to_dict("records"), per_box, strict=True)):
        pred = predicted.box if predicted.box is not None else None
        pred_orig = (
            [pred[0] / item.scale_x, pred[1] / item.scale_y, pred[2] / item.scale_x,
             pred[3] / item.scale_y] if pred is not None else [np.nan] * 4
        )
        row = {
            "image_key": item.key,
            "sha256": record["sha256"],
            "finding": record["finding"],
            "model_finding": finding,
            "box_index": int(record["box_index"]),
            "width": item.width,
            "height": item.height,
            **{c: float(record[c]) for c in BOX_COLUMNS},
            "method": method,
            "probability": probability,
            "logit": logit,
            "iou": scores["iou"],
            "iobb": scores["iobb"],
            "pointing_hit": bool(pointing_game_hit(positive_map, boxes_model[i : i + 1],
                                                   tolerance)),
            "best_match": i == best,
            "pred_x": pred_orig[0],
            "pred_y": pred_orig[1],
            "pred_w": pred_orig[2],
            "pred_h": pred_orig[3],
            "threshold": settings.threshold,
        }
        for t in HIT_THRESHOLDS:
            row[f"iou_hit_{t}"] = bool(scores["iou"] >= t)
            row[f"iobb_hit_{t}"] = bool(scores["iobb"] >= t)
        rows.append(row)
    return rows


def _costly_metrics(
    model: Any,
    item: LoadedImage,
    finding: str,
    k: int,
    target_idx: torch.Tensor,
    boxes_model: np.ndarray,
    results: dict[str, Any],
    settings: AuditSettings,
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Repeatability, randomization and fidelity for one (image, finding), every saliency method."""
    from audit.metrics import fidelity, randomization, repeatability
    from audit.saliency import get_method

    x = item.tensor.unsqueeze(0).to(model.device)
    target = target_idx[:, k : k + 1]
    out_index = int(target[0, 0])
    per_method: dict[str, dict[str, float]] = {}
    curves: list[dict[str, Any]] = []
    tolerance = pointing_tolerance_px(item.width, item.scale_x)
    options = _method_options(settings)
    for method in settings.methods:
        explainer = get_method(method, **options)
        original = results[method].maps[0, k].detach().float().cpu().numpy()
        figures: dict[str, float] = {}

        def explain_fn(net: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
                       _explainer: Any = explainer) -> np.ndarray:
            return _explainer.explain(model.with_net(net), images, targets).maps.detach() \
                .float().cpu().numpy()

        if "repeatability" in settings.metrics:
            figures.update(
                repeatability.repeatability_figures(
                    explain_fn=explain_fn, net=model.net, image=x[0], target=out_index,
                    original_map=original, boxes=boxes_model, threshold=settings.threshold,
                    tolerance_px=tolerance, noise_sigma=settings.noise_sigma * 2048.0,
                    shift_px=settings.shift_px, seed=settings.seed,
                )
            )
        if "randomization" in settings.metrics:
            blocks = settings.randomization_blocks or list(randomization.DENSENET_CASCADE)
            cascade = randomization.cascading_randomization(
                model.net, x, target, explain_fn, seed=settings.seed, blocks=blocks,
                original_maps=original[None, None],
            )
            for row in randomization.curve_long_rows(cascade):
                curves.append({"image_key": item.key, "finding": finding, "method": method,
                               "family": row["family"], "step": row["step"], "x": row["x"],
                               "label": row["label"], "metric": row["metric"],
                               "value": row["value"]})
            figures.update(randomization.randomization_figures(cascade))
        if "fidelity" in settings.metrics:
            for order in ("saliency", "random"):
                curve = fidelity.deletion_insertion_curves(
                    _probability_fn(model, out_index), x[0], original,
                    step_fraction=settings.fidelity_step, baseline=settings.fidelity_baseline,
                    order=order, seed=settings.seed, batch_size=settings.fidelity_batch_size,
                )
                figures.update(curve.figures())
                for row in curve.long_rows():
                    curves.append({"image_key": item.key, "finding": finding, "method": method,
                                   "label": "", "metric": "probability", **row})
        per_method[method] = figures
    return per_method, curves


def _probability_fn(model: Any, out_index: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def predict(batch: torch.Tensor) -> torch.Tensor:
        return model.probabilities(batch)[:, out_index]

    return predict


# ---------------------------------------------------------------------------------------------
# assembling a run directory


def _concat(batch_dirs: list[Path], name: str) -> pd.DataFrame:
    frames = [pd.read_parquet(d / f"{name}.parquet") for d in batch_dirs
              if (d / f"{name}.parquet").exists()]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _package_versions() -> dict[str, str]:
    from importlib import metadata

    names = ["cxr-audit", "torch", "torchvision", "torchxrayvision", "numpy", "scipy", "pandas",
             "pydicom", "prefect", "scikit-image", "monai"]
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def assemble_run(
    run: Any,
    batch_dirs: list[Path],
    selection: Selection,
    settings: AuditSettings,
    model: Any,
    manifest_csv: Path,
    manifest_sidecar: dict[str, Any],
    started_at: Any,
    timings: dict[str, float],
    host: str,
) -> Path:
    """Combine batch results, aggregate per pathology, write the run's files into its staging
    folder and return that folder (the caller renders the report, then finishes the run)."""
    from datetime import datetime, timezone

    from audit.metrics.aggregation import (
        aggregate_per_pathology,
        evaluate_criteria,
        paired_difference,
    )
    from audit.store.files import sha256_file

    boxes = _concat(batch_dirs, "boxes")
    images = _concat(batch_dirs, "images")
    curves = _concat(batch_dirs, "curves")
    predictions = _concat(batch_dirs, "predictions")
    rejects = _concat(batch_dirs, "rejects")
    ingest_rejects_path = Path(str(manifest_csv).removesuffix(".csv") + ".rejects.csv")
    if ingest_rejects_path.exists():
        ingest_rejects = pd.read_csv(ingest_rejects_path, dtype=str).fillna("")
        rejects = pd.concat([ingest_rejects, rejects], ignore_index=True)
    if rejects.empty:
        rejects = pd.DataFrame(columns=["path", "image_key", "finding", "reason"])

    if len(boxes):
        boxes.insert(0, "run_id", run.run_id)
        boxes["pathology"] = boxes["model_finding"]
        per_pathology = aggregate_per_pathology(boxes, seed=settings.seed)
        per_pathology = evaluate_criteria(per_pathology, settings.acceptance)
        paired_frames = []
        methods = [m for m in settings.methods if m in set(boxes["method"])]
        for i, method_a in enumerate(methods):
            for method_b in methods[i + 1 :] + [b for b in settings.baselines
                                                if b in set(boxes["method"])]:
                for metric in ("iou", "pointing_hit"):
                    frame = boxes.assign(pointing_hit=boxes["pointing_hit"].astype(float))
                    paired_frames.append(paired_difference(
                        frame, method_a, method_b, metric=metric, seed=settings.seed,
                        by="pathology", best_match=True,
                        keys=("image_key", "finding", "box_index")))
        paired = pd.concat(paired_frames, ignore_index=True) if paired_frames else pd.DataFrame()
    else:
        per_pathology = pd.DataFrame()
        paired = pd.DataFrame()

    staging = run.staging
    thumbs = staging / "thumbs"
    thumbs.mkdir(exist_ok=True)
    for batch in batch_dirs:
        for thumb in sorted((batch / "thumbs").glob("*.png")):
            shutil.copyfile(thumb, thumbs / thumb.name)

    average_maps: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch in batch_dirs:
        batch_counts = json.loads((batch / "map_counts.json").read_text())
        with np.load(batch / "map_sums.npz") as sums:
            for key in sums.files:
                average_maps[key] = average_maps.get(key, 0) + sums[key]
                counts[key] = counts.get(key, 0) + int(batch_counts[key])
    average_maps = {k: (v / counts[k]).astype(np.float32) for k, v in average_maps.items()}
    size = settings.image_size
    if len(boxes):
        unique_boxes = boxes.drop_duplicates(["image_key", "model_finding", "box_index"])
        for finding, group in unique_boxes.groupby("model_finding"):
            acc = np.zeros((size, size), dtype=np.float64)
            for record in group.to_dict("records"):
                acc += _box_indicator(record, size, selection.manifest)
            average_maps[f"expert|{finding}"] = (acc / len(group)).astype(np.float32)
    _write_npz(staging / "average_maps.npz", average_maps)

    if settings.save_maps:
        maps_dir = staging / "maps"
        maps_dir.mkdir(exist_ok=True)
        per_method: dict[str, dict[str, np.ndarray]] = {}
        for batch in batch_dirs:
            if not (batch / "maps.npz").exists():
                continue
            with np.load(batch / "maps.npz") as saved:
                for key in saved.files:
                    method, rest = key.split("|", 1)
                    per_method.setdefault(method, {})[rest] = saved[key]
        for method, arrays in per_method.items():
            _write_npz(maps_dir / f"{method}.npz", arrays)

    run.write_table(boxes, "boxes.parquet")
    run.write_table(boxes, "boxes.csv")
    run.write_table(images, "images.parquet")
    run.write_table(curves, "curves.parquet")
    run.write_table(predictions, "predictions.parquet")
    run.write_table(per_pathology, "per_pathology.csv")
    run.write_json("per_pathology.json", json.loads(per_pathology.to_json(orient="records")))
    run.write_table(paired, "paired.csv")
    run.write_table(rejects, "rejects.csv")

    finished_at = datetime.now(timezone.utc)
    published = bool(settings.weights)
    run_json = {
        "run_id": run.run_id,
        "started_at": started_at.isoformat(),
        "finished_at": finished_at.isoformat(),
        "status": "finished",
        "model": {
            "name": model.name,
            "fingerprint": model.fingerprint,
            "source": "weights" if settings.weights else (
                "checkpoint" if settings.checkpoint else "random-init"),
            "seed": settings.model_seed,
            "published": published,
            "checkpoint_sha256": sha256_file(Path(settings.checkpoint))
            if settings.checkpoint else None,
            "pathologies": [p for p in model.pathologies if p],
        },
        "dataset": {
            "name": manifest_sidecar.get("name", Path(manifest_csv).stem),
            "manifest_path": str(manifest_csv),
            "manifest_sha256": sha256_file(Path(manifest_csv)),
            "images_dir": manifest_sidecar.get("images_dir"),
            "n_images": int(selection.manifest["image_key"].nunique()),
            "n_boxes": int(selection.manifest["box_x"].notna().sum()),
        },
        "settings": settings.to_dict(),
        "sampled": selection.record,
        "versions": _package_versions(),
        "device": str(model.device),
        "cuda": {"device_name": torch.cuda.get_device_name(model.device),
                 "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                 "tf32_cudnn": torch.backends.cudnn.allow_tf32}
        if model.device.type == "cuda" else None,
        "git_commit": _git_commit(),
        "host": host,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "acceptance_criteria": settings.acceptance,
        "target_layer": "features.norm5 (rectified: ReLU(norm5) as pooled)",
        "batches": [Path(b).name for b in batch_dirs],
        "files": {},
    }
    run_json["files"] = {
        p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()
    }
    run.write_json("run.json", run_json)
    return run.staging


def _box_indicator(record: dict[str, Any], size: int, manifest: pd.DataFrame) -> np.ndarray:
    """The expert box drawn as a 0/1 mask at model resolution (pixel centres inside the box)."""
    row = manifest[manifest["image_key"] == record["image_key"]].iloc[0]
    scale_x, scale_y = size / float(row["width"]), size / float(row["height"])
    x, y = record["box_x"] * scale_x, record["box_y"] * scale_y
    w, h = record["box_w"] * scale_x, record["box_h"] * scale_y
    centres = np.arange(size) + 0.5
    cols = (centres >= x) & (centres <= x + w)
    rows = (centres >= y) & (centres <= y + h)
    return np.outer(rows, cols).astype(np.float64)
