"""Planning a run: which images it audits (seeded stratified samples), which (image, finding)
pairs get the costly metric families, how images fall into batches, and each batch's content
key (images, boxes, model, settings, code), so an interrupted run resumes from finished batches.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from audit.config import AuditSettings
from audit.data.preprocess import preprocess_settings
from audit.metrics.sampling import stratified_sample
from audit.store.rundir import BOX_GEOMETRY

#: Seed offsets of the samples drawn from one ``--seed``, so the draws are independent.
COSTLY_SEED_OFFSET = 1
CAP_SEED_OFFSET = 2
LIMIT_SEED_OFFSET = 3
IG_SEED_OFFSET = 4
IG_METHOD = "integrated_gradients"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Selection:
    """Which images the run audits, and which (image, finding) pairs get the costly metrics."""

    manifest: pd.DataFrame
    costly: list[tuple[str, str]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    #: The (image, finding) pairs IG explains; None: every target (no ``ig_per_pathology``).
    ig: list[tuple[str, str]] | None = None


@dataclass(frozen=True)
class BatchPlan:
    """One batch: its index, content key, image keys and costly pairs."""

    index: int
    key: str
    image_keys: list[str]
    costly: list[tuple[str, str]]
    ig: list[tuple[str, str]] | None = None


def _sampled_keys(df: pd.DataFrame, per_group: int, group_col: str, seed: int) -> set[str]:
    return set(stratified_sample(df, per_group, group_col, seed=seed,
                                 unit_col="image_key")["image_key"])


def select_images(manifest: pd.DataFrame, settings: AuditSettings) -> Selection:
    """Apply ``per_pathology`` (images per finding) and ``limit`` (images in all), both drawn by
    `stratified_sample` from ``seed``, then draw the costly-metrics pairs per model finding."""
    seed = int(settings.seed)
    chosen = set(manifest["image_key"].unique())
    record: dict[str, Any] = {"seed": seed, "sampler": "audit.metrics.sampling.stratified_sample"}
    if settings.per_pathology:
        boxed = manifest.dropna(subset=["box_x"])
        chosen = _sampled_keys(boxed, settings.per_pathology, "finding", seed)
        record["per_pathology"] = settings.per_pathology
    if settings.limit is not None and len(chosen) > settings.limit:
        pool = pd.DataFrame({"image_key": sorted(chosen), "all": "all"})
        chosen = _sampled_keys(pool, settings.limit, "all", seed + LIMIT_SEED_OFFSET)
        record["limit"] = settings.limit
    selected = manifest[manifest["image_key"].isin(chosen)].copy()
    selected = selected.sort_values(["image_key", "finding", "box_index"], na_position="first")
    record["images"] = sorted(chosen)
    ig = ig_pairs(selected, settings)
    if ig is not None:
        record["ig_per_pathology"] = settings.ig_per_pathology
        record["ig_sample"] = [list(p) for p in ig]
    costly = costly_pairs(selected, settings, within=ig)
    record["costly_sample"] = [list(p) for p in costly]
    return Selection(manifest=selected.reset_index(drop=True), costly=costly, record=record,
                     ig=ig)


def _boxed_pairs(selected: pd.DataFrame) -> pd.DataFrame:
    return (selected.dropna(subset=["box_x"])[["image_key", "model_finding"]]
            .drop_duplicates().reset_index(drop=True))


def ig_pairs(selected: pd.DataFrame, settings: AuditSettings) -> list[tuple[str, str]] | None:
    """With ``ig_per_pathology`` N (and IG among the methods): up to N boxed (image, model
    finding) pairs per model finding, drawn by `stratified_sample` (pairs in image-key order,
    seed ``seed + IG_SEED_OFFSET``); IG explains only these, every other method every target.
    None otherwise (IG on every target)."""
    if not settings.ig_per_pathology or IG_METHOD not in settings.methods:
        return None
    drawn = stratified_sample(_boxed_pairs(selected), settings.ig_per_pathology,
                              "model_finding", seed=int(settings.seed) + IG_SEED_OFFSET,
                              sort_by=["image_key"])
    return sorted((str(k), str(f)) for k, f in zip(drawn["image_key"], drawn["model_finding"],
                                                   strict=True))


def costly_pairs(selected: pd.DataFrame, settings: AuditSettings,
                 within: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Up to ``costly_per_pathology`` boxed images per model finding (then at most
    ``costly_max_pairs`` in all) for repeatability, randomization and fidelity; drawn among
    ``within`` (the IG sample, so every method has the pair's map) when given."""
    if not (set(settings.metrics) - {"localization"}) or settings.costly_per_pathology <= 0:
        return []
    pairs = _boxed_pairs(selected)
    if within is not None:
        keep = pd.MultiIndex.from_tuples(within, names=["image_key", "model_finding"])
        pairs = pairs[pd.MultiIndex.from_frame(pairs).isin(keep)].reset_index(drop=True)
    seed = int(settings.seed)
    drawn = stratified_sample(pairs, settings.costly_per_pathology, "model_finding",
                              seed=seed + COSTLY_SEED_OFFSET, sort_by=["image_key"])
    if settings.costly_max_pairs is not None and len(drawn) > settings.costly_max_pairs:
        pool = drawn[["image_key", "model_finding"]].assign(all="all").reset_index(drop=True)
        drawn = stratified_sample(pool, settings.costly_max_pairs, "all",
                                  seed=seed + CAP_SEED_OFFSET,
                                  sort_by=["model_finding", "image_key"])
    return sorted((str(k), str(f)) for k, f in zip(drawn["image_key"], drawn["model_finding"],
                                                   strict=True))


@functools.lru_cache(maxsize=4)
def code_fingerprint(root: Path = PACKAGE_ROOT) -> str:
    """sha256 over the installed package's source and data files (``*.py``, ``*.json``; the
    shipped weights are covered by the model fingerprint): any code change, preprocessing
    included, gives a new batch key, so stale batches are never reused."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.suffix in (".py", ".json")
                       and not {"__pycache__", "weights"} & set(p.relative_to(root).parts)):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def batch_cache_key(rows: pd.DataFrame, costly: Iterable[tuple[str, str]],
                    model_fingerprint: str, settings: AuditSettings,
                    code: str | None = None,
                    ig: Iterable[tuple[str, str]] | None = None) -> str:
    """A key from content only: image bytes, boxes, model weights, settings, preprocessing and
    the package's code (``code``: `code_fingerprint()` of the installed package by default)."""
    payload = {
        "images": sorted(zip(rows["image_key"], rows["sha256"], strict=True)),
        "boxes": rows[["image_key", "model_finding", *BOX_GEOMETRY]].astype(str).values.tolist(),
        "costly": sorted(tuple(p) for p in costly),
        "ig": None if ig is None else sorted(tuple(p) for p in ig),
        "model": model_fingerprint,
        "settings": settings.compute_key(),
        "preprocess": preprocess_settings(settings.image_size),
        "code": code or code_fingerprint(),
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def plan_batches(selection: Selection, settings: AuditSettings,
                 model_fingerprint: str) -> list[BatchPlan]:
    """Images in sorted key order, ``batch_size`` per batch, each with its content key."""
    keys = sorted(selection.manifest["image_key"].unique())
    plans = []
    for index, start in enumerate(range(0, len(keys), settings.batch_size)):
        image_keys = keys[start : start + settings.batch_size]
        rows = selection.manifest[selection.manifest["image_key"].isin(image_keys)]
        members = set(image_keys)
        costly = [p for p in selection.costly if p[0] in members]
        ig = None if selection.ig is None else [p for p in selection.ig if p[0] in members]
        key = batch_cache_key(rows, costly, model_fingerprint, settings, ig=ig)
        plans.append(BatchPlan(index, key, image_keys, costly, ig))
    return plans
