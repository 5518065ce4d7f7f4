"""Explain and score one batch of images into its result folder (`rundir.BATCH_FILES`).

Box rows come from one `audit.metrics.localization.localization_table` call per batch (the
documented scoring: best box by IoU, then IoBB, then index; pointing tolerance by
`pointing_tolerance_px`), with the box and predicted-box geometry put back into each image's
original frame.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from audit.config import AuditSettings
from audit.data.nih import to_model_finding
from audit.metrics.localization import localization_table
from audit.metrics.pointing import pointing_tolerance_px
from audit.protocol import NIH_FRAME_PX
from audit.run.costly import CostlyPair, costly_metrics
from audit.run.images import LoadedBatch, LoadedImage, load_batch_images, reject_row
from audit.run.plan import IG_METHOD
from audit.saliency.batched import BatchExplanation, explain_batch
from audit.store.files import atomic_write_bytes, atomic_write_json, atomic_write_table, write_npz
from audit.store.gallery_maps import gallery_entry
from audit.store.rundir import (
    BOX_GEOMETRY,
    GALLERY_MAPS,
    REJECT_COLUMNS,
    map_key,
    saved_map_key,
    thumbnail_name,
)


def label_findings(labels: Any) -> list[str]:
    """Model finding names of an image's NIH label text ("A|B", "No Finding" dropped)."""
    names = [n for n in str(labels).split("|") if n and n != "No Finding"]
    return sorted({to_model_finding(n) for n in names})


@dataclass
class ImageRows:
    """What a batch reads from one image's manifest rows, read once: the file's path, its box
    rows by model finding (manifest order, original frame), the model findings of its labels,
    every model finding its rows name, and whether it has labels at all."""

    path: str
    boxes: dict[str, pd.DataFrame]
    label_findings: list[str]
    named_findings: set[str]
    has_labels: bool

    def boxes_of(self, finding: str, empty: pd.DataFrame) -> pd.DataFrame:
        return self.boxes.get(finding, empty)


def image_rows(rows: pd.DataFrame) -> dict[str, ImageRows]:
    """`ImageRows` of every image of a batch's manifest rows, by image key (labels: an image's
    first non-empty label text)."""
    boxes: dict[str, dict[str, pd.DataFrame]] = {}
    boxed = rows.dropna(subset=["box_x"])
    # a box without a model finding ("": no output has that name) becomes a rejects row
    findings = boxed["model_finding"].fillna("").astype(str)
    for (key, finding), group in boxed.groupby([boxed["image_key"], findings], sort=True):
        boxes.setdefault(str(key), {})[finding] = group
    paths: dict[str, str] = {}
    labels: dict[str, Any] = {}
    named: dict[str, set[str]] = {}
    label_column = rows["labels"] if "labels" in rows else pd.Series(None, index=rows.index)
    for key, path, label, finding in zip(rows["image_key"].astype(str), rows["path"],
                                         label_column, rows["model_finding"], strict=True):
        paths.setdefault(key, str(path))
        named.setdefault(key, set())
        if not pd.isna(finding):
            named[key].add(finding)
        if not pd.isna(label):
            labels.setdefault(key, label)
    return {key: ImageRows(path=path, boxes=boxes.get(key, {}),
                           label_findings=label_findings(labels[key]) if key in labels else [],
                           named_findings=named[key], has_labels=key in labels)
            for key, path in paths.items()}


def pointing_tolerance_for(item: LoadedImage) -> float:
    """15 px at the 1024 frame, in map pixels (the map covers the whole image)."""
    return pointing_tolerance_px(item.pre.size, frame_size=NIH_FRAME_PX)


class MapOwner(NamedTuple):
    """Where one pending map comes from: its image, its finding's boxes (manifest rows, original
    frame), the finding, the method, and the finding's probability and logit."""

    item: LoadedImage
    boxes: pd.DataFrame
    finding: str
    method: str
    probability: float
    logit: float


@dataclass
class PendingScores:
    """The maps of a batch that have expert boxes, scored together by `box_table` (one
    `localization_table` call per batch)."""

    maps: list[np.ndarray] = field(default_factory=list)
    boxes_in_model: list[np.ndarray] = field(default_factory=list)
    owners: list[MapOwner] = field(default_factory=list)

    def add(self, item: LoadedImage, boxes: pd.DataFrame, in_model: np.ndarray, finding: str,
            maps: dict[str, np.ndarray], probability: float, logit: float) -> None:
        """``maps``: method -> non-negative map at model resolution; ``boxes``: the manifest
        rows of this finding's boxes (original frame), ``in_model`` the same in the map's."""
        for method, saliency in maps.items():
            self.maps.append(saliency)
            self.boxes_in_model.append(in_model)
            self.owners.append(MapOwner(item, boxes, finding, method, probability, logit))


@dataclass
class BatchTables:
    """The rows and map sums one batch collects."""

    pending: PendingScores = field(default_factory=PendingScores)
    images: list[dict[str, Any]] = field(default_factory=list)
    curves: list[dict[str, Any]] = field(default_factory=list)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, str]] = field(default_factory=list)
    map_sums: dict[str, np.ndarray] = field(default_factory=dict)
    map_counts: dict[str, int] = field(default_factory=dict)
    saved_maps: dict[str, np.ndarray] = field(default_factory=dict)
    gallery_maps: dict[str, np.ndarray] = field(default_factory=dict)

    def add_to_average(self, method: str, finding: str, positive: np.ndarray) -> None:
        key = map_key(method, finding)
        top = positive.max()
        unit = positive / top if top > 0 else positive
        self.map_sums[key] = self.map_sums.get(key, 0) + unit.astype(np.float64)
        self.map_counts[key] = self.map_counts.get(key, 0) + 1


def image_targets(model: Any, image: ImageRows, item: LoadedImage,
                  rejects: list[dict[str, str]]) -> list[str]:
    """An image's targets: the model findings of its boxes (of its labels when it has none);
    findings the model does not predict become rejects rows."""
    wanted = sorted(image.boxes) if image.boxes else image.label_findings
    known = set(model.pathologies) - {""}
    for name in wanted:
        if name not in known:
            rejects.append(reject_row(image.path, item.key,
                                      f"finding {name!r} is not an output of the model", name))
    return [f for f in wanted if f in known]


def prediction_rows(model: Any, image: ImageRows, item: LoadedImage, logits: np.ndarray,
                    probs: np.ndarray) -> list[dict[str, Any]]:
    """One row per model output: logit, probability, and the label when the image has labels."""
    labelled = set(image.label_findings) | image.named_findings
    return [{"image_key": item.key, "finding": name, "logit": float(logits[i]),
             "probability": float(probs[i]),
             "label": float(name in labelled) if image.has_labels or name in labelled
             else np.nan}
            for i, name in enumerate(model.pathologies) if name]


PRED_GEOMETRY = ["pred_x", "pred_y", "pred_w", "pred_h"]


def box_table(pending: PendingScores, threshold: float) -> pd.DataFrame:
    """One row per (expert box, method) from `localization_table`, with the box and predicted-box
    geometry in each image's original frame; rows in the order the maps were added."""
    if not pending.maps:
        return pd.DataFrame()
    items = [owner.item for owner in pending.owners]
    # every map of a batch is at the model's input size, so one pointing tolerance serves all
    table = localization_table(np.stack(pending.maps), pending.boxes_in_model,
                               threshold=threshold, tolerance_px=pointing_tolerance_for(items[0]))
    map_of = table.pop("map_index").to_numpy()
    box_of = table.pop("box_index").to_numpy()
    pred = table[PRED_GEOMETRY].to_numpy(dtype=np.float64, copy=True)
    for i in np.unique(map_of):  # back to the image's own frame
        rows = map_of == i
        pred[rows] = items[i].pre.boxes_to_original(pred[rows])
    table[PRED_GEOMETRY] = pred
    sources = pd.concat([owner.boxes for owner in pending.owners], ignore_index=True)
    starts = np.cumsum([0] + [len(owner.boxes) for owner in pending.owners])[:-1]
    source = sources.iloc[starts[map_of] + box_of]
    for name in BOX_GEOMETRY:
        table[name] = source[name].to_numpy(dtype=np.float64)

    def per_map(values: list[Any]) -> np.ndarray:
        return np.asarray(values, dtype=object)[map_of]

    front = pd.DataFrame({
        "image_key": per_map([item.key for item in items]),
        "sha256": source["sha256"].to_numpy(dtype=object),
        "finding": source["finding"].to_numpy(dtype=object),
        "model_finding": per_map([owner.finding for owner in pending.owners]),
        "box_index": source["box_index"].to_numpy(dtype=np.int64),
        "width": np.asarray([item.width for item in items], dtype=np.int64)[map_of],
        "height": np.asarray([item.height for item in items], dtype=np.int64)[map_of],
        "method": per_map([owner.method for owner in pending.owners]),
        "probability": np.asarray([owner.probability for owner in pending.owners])[map_of],
        "logit": np.asarray([owner.logit for owner in pending.owners])[map_of],
    })
    return pd.concat([front, table], axis=1)


def audit_batch(model: Any, rows: pd.DataFrame, images_root: Path, settings: AuditSettings,
                costly: Iterable[tuple[str, str]], out_dir: Path,
                loaded: LoadedBatch | None = None,
                ig_pairs: Iterable[tuple[str, str]] | None = None,
                device_done: Callable[[], None] | None = None) -> Path:
    """Explain and score one batch; write its folder atomically (staged, then renamed) and
    return it. ``loaded``: the batch's images when already decoded (`ImagePrefetcher`);
    ``ig_pairs``: the (image, finding) pairs IG explains (None: every target);
    ``device_done``: called once the batch no longer needs the model (its last explain or
    costly metric done), e.g. to start decoding the next batch on the CPU's cores."""
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "thumbs").mkdir(parents=True)
    tables = BatchTables()
    items, tables.rejects = loaded or load_batch_images(rows, images_root, settings.image_size)
    tables.rejects = list(tables.rejects)
    for item in items:
        atomic_write_bytes(staging / "thumbs" / thumbnail_name(item.key), item.thumb_png)
    images = image_rows(rows)
    no_boxes = rows.iloc[0:0]
    targets = [image_targets(model, images[item.key], item, tables.rejects) for item in items]
    names = list(settings.methods) + list(settings.baselines)
    explained = _explain(model, items, targets, names, settings, ig_pairs)
    costly_set = {tuple(p) for p in costly}
    if device_done is not None and not costly_set:
        device_done()
    logits_np = explained.logits.float().cpu().numpy()
    probs = model.probabilities_from_logits(explained.logits).float().cpu().numpy()
    pairs: list[CostlyPair] = []
    for index, item in enumerate(items):
        image = images[item.key]
        tables.predictions += prediction_rows(model, image, item, logits_np[index],
                                             probs[index])
        for finding in targets[index]:
            pairs += _score_target(model, item, image.boxes_of(finding, no_boxes), finding,
                                   explained, index, logits_np[index], probs[index],
                                   costly_set, settings, tables)
    _add_costly(model, pairs, settings, tables)
    if device_done is not None and costly_set:
        device_done()
    _write_batch(staging, tables, box_table(tables.pending, settings.threshold),
                 settings.save_maps)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


def _explain(model: Any, items: list[LoadedImage], targets: list[list[str]], names: list[str],
             settings: AuditSettings,
             ig_pairs: Iterable[tuple[str, str]] | None) -> BatchExplanation:
    """One batch-level explanation of every image and target (`explain_batch`); IG only on
    ``ig_pairs`` when given."""
    if not items:
        empty = torch.zeros((0, len(model.pathologies)))
        return BatchExplanation(logits=empty, results=[], targets={n: [] for n in names})
    x = torch.stack([item.tensor for item in items]).to(model.device)
    indices = [[model.finding_index(t) for t in found] for found in targets]
    own: dict[str, list[list[int]]] = {}
    if ig_pairs is not None and IG_METHOD in names:
        chosen = {tuple(p) for p in ig_pairs}
        own[IG_METHOD] = [[model.finding_index(t) for t in found if (item.key, t) in chosen]
                          for item, found in zip(items, targets, strict=True)]
    return explain_batch(model, x, indices, names, method_targets=own,
                         **settings.saliency_options())


def _score_target(model: Any, item: LoadedImage, boxes: pd.DataFrame, finding: str,
                  explained: BatchExplanation, index: int, logits: np.ndarray,
                  probs: np.ndarray, costly_set: set[tuple[str, str]], settings: AuditSettings,
                  tables: BatchTables) -> list[CostlyPair]:
    """Image, box and map rows of one target (finding) of image ``index``, whose expert boxes
    are ``boxes`` (manifest rows, original frame; none for a target from the labels); returns
    its costly pair, if it has one."""
    results = explained.results[index]
    out = model.finding_index(finding)
    prob, logit = float(probs[out]), float(logits[out])
    positive: dict[str, np.ndarray] = {}
    ks = {m: explained.map_index(index, m, out) for m in explained.targets}
    for method in [m for m in explained.targets if ks[m] is not None]:
        k = ks[method]
        # The one place where each (image, finding, method) map is a numpy array.
        saliency = results[method].maps[0, k].detach().float().cpu().numpy()
        positive[method] = np.clip(saliency, 0, None)
        tables.add_to_average(method, finding, positive[method])
        if settings.save_maps:
            key = map_key(method, saved_map_key(item.key, finding))
            tables.saved_maps[key] = saliency.astype(np.float16)
        tables.gallery_maps.update(gallery_entry(method, item.key, finding, saliency,
                                                 item.pre.boxes_to_original))
        extras = {n: float(v[0, k]) for n, v in results[method].extras.items()}
        tables.images.append({"image_key": item.key, "finding": finding, "method": method,
                              "probability": prob, "logit": logit, **extras})
    in_model = item.pre.boxes_to_model(boxes[BOX_GEOMETRY].to_numpy(dtype=np.float64))
    if len(boxes):
        tables.pending.add(item, boxes, in_model, finding, positive, prob, logit)
    if (item.key, finding) in costly_set:
        return [CostlyPair(item, finding, results, ks, in_model, pointing_tolerance_for(item))]
    return []


def _add_costly(model: Any, pairs: list[CostlyPair], settings: AuditSettings,
                tables: BatchTables) -> None:
    """The costly figures into the image rows of their pairs, their curves into the table."""
    if not pairs:
        return
    figures, curves = costly_metrics(model, pairs, settings)
    for row in tables.images:
        row.update(figures.get((row["image_key"], row["finding"], row["method"]), {}))
    tables.curves += curves


def _write_batch(staging: Path, tables: BatchTables, boxes: pd.DataFrame,
                 save_maps: bool) -> None:
    frames = {"boxes": boxes, "images": pd.DataFrame(tables.images),
              "curves": pd.DataFrame(tables.curves),
              "predictions": pd.DataFrame(tables.predictions),
              "rejects": pd.DataFrame(tables.rejects, columns=REJECT_COLUMNS)}
    for name, frame in frames.items():
        atomic_write_table(frame, staging / f"{name}.parquet")
    write_npz(staging / "map_sums.npz", tables.map_sums)
    atomic_write_json(staging / "map_counts.json", tables.map_counts)
    write_npz(staging / GALLERY_MAPS, tables.gallery_maps)
    if save_maps:
        write_npz(staging / "maps.npz", tables.saved_maps)
