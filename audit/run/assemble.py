"""Batch result folders -> a run directory (`audit.store.rundir`): tables concatenated, aggregates
per pathology with their criteria, paired comparisons, average maps, thumbnails, saved maps and
run.json. The caller renders the report into the staging folder, then finishes the run."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from audit.config import AuditSettings
from audit.data.manifest import rejects_path
from audit.data.preprocess import box_mask, scale_boxes
from audit.metrics.aggregation import aggregate_per_pathology, paired_difference
from audit.metrics.criteria import evaluate_criteria
from audit.protocol import BEATS
from audit.report.cases import shown_maps
from audit.run.plan import Selection
from audit.run.provenance import (
    code_section,
    dataset_section,
    environment_section,
    model_section,
)
from audit.store.gallery_maps import keep_gallery_maps
from audit.store.rundir import (
    BOX_GEOMETRY,
    CALLED_POSITIVE_AT,
    GALLERY_MAPS,
    PER_PATHOLOGY_TP,
    REJECT_COLUMNS,
    RUN_JSON,
    RunDirectory,
    average_map_key,
    read_npz,
    read_table,
    table_records,
)


@dataclass
class RunContext:
    """What the run directory records besides the batches' results."""

    selection: Selection
    settings: AuditSettings
    model: Any
    manifest_csv: Path
    manifest_sidecar: dict[str, Any]
    started_at: datetime
    timings: dict[str, float]
    host: str


def concat_batches(batch_dirs: list[Path], name: str) -> pd.DataFrame:
    """Table ``name`` of every batch folder, concatenated (empty when none has rows)."""
    frames = [read_table(d, name) for d in batch_dirs]
    frames = [f for f in frames if f is not None and len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def all_rejects(batch_dirs: list[Path], manifest_csv: Path) -> pd.DataFrame:
    """The ingest's rejects (beside the manifest) followed by the batches' rejects."""
    frames = []
    ingest_rejects = rejects_path(manifest_csv)
    if ingest_rejects.exists():
        frames.append(pd.read_csv(ingest_rejects, dtype=str).fillna(""))
    frames.append(concat_batches(batch_dirs, "rejects"))
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=REJECT_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def aggregates(boxes: pd.DataFrame, settings: AuditSettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(per_pathology with verdicts, paired differences)``; empty frames with the documented
    columns when no box was scored. The paired differences (every method against the later
    methods and every baseline, best match per image-finding, by pathology) cover IoU, the
    pointing game and every metric a baseline criterion names; the verdicts read them."""
    if boxes.empty:
        return pd.DataFrame(), pd.DataFrame()
    present = set(boxes["method"])
    methods = [m for m in settings.methods if m in present]
    baselines = [b for b in settings.baselines if b in present]
    metrics = list(dict.fromkeys(["iou", "pointing_hit", *(
        c["metric"] for c in settings.acceptance if c.get("op") == BEATS)]))
    frame = boxes.assign(pointing_hit=boxes["pointing_hit"].astype(float))
    pairs = [paired_difference(frame, a, b, metric=metric, seed=settings.seed, by="pathology",
                               best_match=True, keys=("image_key", "finding", "box_index"))
             for i, a in enumerate(methods) for b in methods[i + 1:] + baselines
             for metric in metrics]
    paired = pd.concat(pairs, ignore_index=True) if pairs else pd.DataFrame()
    per_pathology = evaluate_criteria(aggregate_per_pathology(boxes, seed=settings.seed),
                                      settings.acceptance, paired)
    return per_pathology, paired


def average_maps(batch_dirs: list[Path], boxes: pd.DataFrame, size: int) -> dict[str, np.ndarray]:
    """Mean normalized map per method and finding, and the mean expert-box mask per finding."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch in batch_dirs:
        batch_counts = json.loads((batch / "map_counts.json").read_text())
        for key, value in read_npz(batch / "map_sums.npz").items():
            sums[key] = sums.get(key, 0) + value
            counts[key] = counts.get(key, 0) + int(batch_counts[key])
    out = {k: (v / counts[k]).astype(np.float32) for k, v in sums.items()}
    if boxes.empty:
        return out
    unique = boxes.drop_duplicates(["image_key", "model_finding", "box_index"])
    for finding, group in unique.groupby("model_finding"):
        acc = np.zeros((size, size), dtype=np.float64)
        for record in group.to_dict("records"):
            box = np.array([record[c] for c in BOX_GEOMETRY], dtype=np.float64)
            frame = (float(record["width"]), float(record["height"]))
            acc += box_mask(scale_boxes(box, frame, (size, size)), (size, size))
        out[average_map_key(str(finding))] = (acc / len(group)).astype(np.float32)
    return out


def true_positive_aggregates(boxes: pd.DataFrame, settings: AuditSettings) -> pd.DataFrame:
    """per_pathology's figures (no verdicts) on the boxes whose probability for the finding is
    at least `CALLED_POSITIVE_AT`: the true-positive subset that cheXlocalize reports."""
    if boxes.empty:
        return pd.DataFrame()
    called = boxes[pd.to_numeric(boxes["probability"], errors="coerce") >= CALLED_POSITIVE_AT]
    if called.empty:
        return pd.DataFrame()
    return aggregate_per_pathology(called, seed=settings.seed).drop(
        columns=["verdict", "criteria"], errors="ignore")


def copy_thumbnails_and_maps(run: RunDirectory, batch_dirs: list[Path], save_maps: bool) -> None:
    thumbs = run.path("thumbs")
    thumbs.mkdir(exist_ok=True)
    per_method: dict[str, dict[str, np.ndarray]] = {}
    for batch in batch_dirs:
        for thumb in sorted((batch / "thumbs").glob("*.png")):
            shutil.copyfile(thumb, thumbs / thumb.name)
        if save_maps:
            for key, value in read_npz(batch / "maps.npz").items():
                method, rest = key.split("|", 1)
                per_method.setdefault(method, {})[rest] = value
    for method, arrays in per_method.items():
        run.write_npz(f"maps/{method}.npz", arrays)


def assemble_run(run: RunDirectory, batch_dirs: list[Path], ctx: RunContext) -> Path:
    """Write the run's files into its staging folder and return that folder."""
    settings = ctx.settings
    boxes = concat_batches(batch_dirs, "boxes")
    if len(boxes):
        boxes.insert(0, "run_id", run.run_id)
        boxes["pathology"] = boxes["model_finding"]
    per_pathology, paired = aggregates(boxes, settings)
    copy_thumbnails_and_maps(run, batch_dirs, settings.save_maps)
    keep_gallery_maps(batch_dirs, shown_maps(boxes, settings.acceptance), run.path(GALLERY_MAPS))
    run.write_npz("average_maps.npz", average_maps(batch_dirs, boxes, settings.image_size))
    run.write_table(boxes, "boxes.parquet")
    run.write_table(boxes, "boxes.csv")
    for name in ("images", "curves", "predictions"):
        run.write_table(concat_batches(batch_dirs, name), f"{name}.parquet")
    run.write_table(per_pathology, "per_pathology.csv")
    run.write_table(true_positive_aggregates(boxes, settings), PER_PATHOLOGY_TP)
    run.write_json("per_pathology.json", table_records(per_pathology))
    run.write_table(paired, "paired.csv")
    run.write_table(all_rejects(batch_dirs, ctx.manifest_csv), "rejects.csv")
    run.write_json(RUN_JSON, run_json(run, batch_dirs, ctx, n_scored=len(boxes)))
    return run.staging


def run_json(run: RunDirectory, batch_dirs: list[Path], ctx: RunContext,
             n_scored: int) -> dict[str, Any]:
    model, settings = ctx.model, ctx.settings
    return {
        "run_id": run.run_id,
        "started_at": ctx.started_at.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "status": "finished",
        "model": model_section(model),
        "dataset": dataset_section(ctx.manifest_csv, ctx.manifest_sidecar,
                                   ctx.selection.manifest),
        "n_box_rows": int(n_scored),
        "settings": settings.to_dict(),
        "sampled": ctx.selection.record,
        **code_section(),
        "device": str(model.device),
        "cuda": model.provenance.get("cuda") if model.device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "environment": environment_section(settings),
        "host": ctx.host,
        "timings": {k: round(v, 3) for k, v in ctx.timings.items()},
        "acceptance_criteria": settings.acceptance,
        "batches": [Path(b).name for b in batch_dirs],
        "files": run.file_hashes(),
    }
