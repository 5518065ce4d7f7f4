"""THE run-directory format: which files a run directory (and a batch's result folder) holds,
their columns and key formats, the writer (`RunDirectory`) and the reader (`read_run`) that the
report, the registry and the calibration use.

A run directory is assembled under a temporary name (``.RUN_ID.partial``) and renamed into place
when the run finishes, so a directory named after a run id is always complete; every file inside
is written atomically. When it finishes, ``run.json``'s ``files`` is sealed: the sha256 of every
other file, sub-folders and the report included (`hashed_files`; `audit.store.verify` checks it).
A finished run directory is never modified. ``docs/interfaces.md``'s
run-directory section is generated from this module (``format_markdown``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from audit.protocol import HIT_THRESHOLDS
from audit.store.files import atomic_write_json, atomic_write_table, sha256_file, write_npz

__all__ = [
    "RUN_JSON", "GALLERY_MAPS", "PER_PATHOLOGY_TP", "CALLED_POSITIVE_AT", "RUN_FILES",
    "BATCH_FILES", "BOX_COLUMNS", "BOX_GEOMETRY", "PER_PATHOLOGY_COLUMNS",
    "REJECT_COLUMNS", "AFTER_FINISH", "hashed_files", "RunDirectoryError", "RunDirectory",
    "RunData", "new_run_id",
    "read_run_json", "read_run", "read_table", "read_npz", "table_records", "map_key",
    "average_map_key",
    "saved_map_key", "thumbnail_name", "format_markdown",
]

RUN_JSON = "run.json"
#: The gallery's map store (audit/store/gallery_maps.py), in every batch and, pruned, in the run.
GALLERY_MAPS = "gallery_maps.npz"
#: per_pathology's figures on the true-positive subset (the model called the finding).
PER_PATHOLOGY_TP = "per_pathology_tp.csv"
FINISHED_STATUS = "finished"

#: Files of a finished run directory, with what each holds.
RUN_FILES: dict[str, str] = {
    RUN_JSON: "provenance: run id, times, model, dataset, settings, versions, environment "
              "(every installed distribution, Python, OS, CPU, GPU, torch flags, seeds); "
              "'files': sha256 of every other file, by path relative to the run (sealed when "
              "the run finishes, sub-folders and the report included)",
    "boxes.parquet": "one row per (expert box, method): BOX_COLUMNS",
    "boxes.csv": "the same rows as CSV",
    "images.parquet": "one row per (image, finding, method): probability, logit, method extras "
                      "(IG completeness gap), repeatability / randomization / fidelity figures",
    "curves.parquet": "long table of curves: image_key, finding, method, family, step, x, label, "
                      "metric, value (randomization cascade, deletion, insertion)",
    "predictions.parquet": "one row per (image, model output): logit, probability, label",
    "per_pathology.csv": "one row per (pathology, method): PER_PATHOLOGY_COLUMNS",
    "per_pathology.json": "the same rows as a JSON list (NaN: null; inf: \"inf\")",
    PER_PATHOLOGY_TP: "per_pathology's figures (no verdicts) on the true-positive subset: the "
                      "boxed images whose probability for the finding is at least "
                      "CALLED_POSITIVE_AT (audit/metrics/aggregation.py, same seed)",
    "paired.csv": "paired differences between methods and baselines per pathology (method_a, "
                  "method_b, metric, n_pairs, mean_diff, diff_lo, diff_hi, p_boot): what the "
                  "baseline criteria are judged on",
    "rejects.csv": "REJECT_COLUMNS: inputs the run could not use, with the reason",
    "average_maps.npz": "mean normalized map per 'method|finding', expert box mask per "
                        "'expert|finding' (model resolution)",
    GALLERY_MAPS: "the display maps (uint8, model resolution) and map maxima of the cases the "
                  "report's galleries show (audit/store/gallery_maps.py), kept without "
                  "--save-maps",
    "thumbs/": "one small PNG per image (thumbnail_name)",
    "maps/": "with --save-maps: maps/<method>.npz, arrays keyed 'image_key|finding' (float16)",
    "report.html": "the self-contained report (and summary.md beside it)",
}

#: Files a command may add to a finished run directory (never replacing one): not sealed in
#: run.json, so `cxr-audit verify` names them as unsealed (a warning) instead of failing.
AFTER_FINISH: dict[str, str] = {
    "report.pdf": "`cxr-audit report RUN_DIR --pdf`: the PDF print of the sealed report.html",
}

#: Files of one batch's result folder (content-addressed cache, assembled into the run).
BATCH_FILES: dict[str, str] = {
    "boxes.parquet": "box rows of the batch",
    "images.parquet": "image rows of the batch",
    "curves.parquet": "curve rows of the batch",
    "predictions.parquet": "prediction rows of the batch",
    "rejects.parquet": "rejects of the batch",
    "map_sums.npz": "sum of normalized maps per 'method|finding'",
    "map_counts.json": "number of maps in each sum",
    "maps.npz": "with --save-maps: maps keyed 'method|image_key|finding'",
    GALLERY_MAPS: "every map as the gallery shows it (uint8) with its maximum, keyed "
                  "'method|image_key|finding' (audit/store/gallery_maps.py)",
    "thumbs/": "thumbnails of the batch's images",
}

#: Box geometry columns in the image's original frame (x, y, w, h).
BOX_GEOMETRY = ["box_x", "box_y", "box_w", "box_h"]
HIT_COLUMNS = [f"{kind}_hit_{t:g}" for kind in ("iou", "iobb") for t in HIT_THRESHOLDS]

#: Columns of ``boxes`` (one row per expert box and method).
BOX_COLUMNS = [
    "run_id", "image_key", "sha256", "finding", "model_finding", "pathology", "box_index",
    "width", "height", *BOX_GEOMETRY, "method", "probability", "logit", "status", "iou", "iobb",
    "coverage", "pointing_hit", "pointing_distance", "best_match", "pred_x", "pred_y", "pred_w",
    "pred_h", *HIT_COLUMNS, "threshold",
]

#: Columns of ``per_pathology`` (one row per pathology and method).
PER_PATHOLOGY_COLUMNS = [
    "pathology", "method", "kind", "n", "iou_mean", "iou_mean_lo", "iou_mean_hi", "iou_median",
    "iobb_mean", "coverage_mean", "pointing_rate", "pointing_lo", "pointing_hi",
    *[f"{c}_rate" for c in HIT_COLUMNS], "verdict", "criteria", "n_needed", "n_needed_approx",
]

REJECT_COLUMNS = ["path", "image_key", "finding", "reason"]
#: A boxed image counts as a true positive when the model's probability for its finding is at
#: least this (the report's "called positive").
CALLED_POSITIVE_AT = 0.5


def table_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of a table as JSON-ready records (``per_pathology.json``): NaN becomes null and an
    infinite number the string "inf" / "-inf" (``n_needed`` = inf means "never"), which strict
    JSON cannot hold as a number."""
    out = df.copy()
    for col in out.select_dtypes(include="number").columns:
        values = out[col]
        if np.isinf(values).any():
            out[col] = values.astype(object).where(~np.isinf(values),
                                                   np.where(values > 0, "inf", "-inf"))
    return json.loads(out.to_json(orient="records"))


# ---- key formats ------------------------------------------------------------------------------


def map_key(method: str, finding: str) -> str:
    """Key of a method's summed / average map for a finding (``map_sums``, ``average_maps``)."""
    return f"{method}|{finding}"


def average_map_key(finding: str) -> str:
    """Key of the mean expert-box mask of a finding in ``average_maps.npz``."""
    return map_key("expert", finding)


def saved_map_key(image_key: str, finding: str) -> str:
    """Key of one saved map inside ``maps/<method>.npz``."""
    return f"{image_key}|{finding}"


def thumbnail_name(image_key: str) -> str:
    """File name of an image's thumbnail under ``thumbs/`` (no path separators survive)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in image_key)
    return f"{safe}.png"


# ---- writing ----------------------------------------------------------------------------------


class RunDirectoryError(RuntimeError):
    """A run directory is missing, unfinished, or would be modified after it finished."""


def new_run_id(now: datetime | None = None, salt: str = "") -> str:
    """``run-YYYYmmddTHHMMSSZ-xxxxxx`` (UTC time and 6 hex digits of a salted hash)."""
    now = now or datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    tail = hashlib.sha256(f"{now.isoformat()}|{salt}|{os.getpid()}".encode()).hexdigest()[:6]
    return f"run-{stamp}-{tail}"


@dataclass
class RunDirectory:
    """A run being written: files go to ``staging``, ``finish()`` renames it to ``final``."""

    run_id: str
    root: Path

    @property
    def final(self) -> Path:
        return self.root / self.run_id

    @property
    def staging(self) -> Path:
        return self.root / f".{self.run_id}.partial"

    @classmethod
    def create(cls, root: Path, run_id: str) -> RunDirectory:
        run = cls(run_id=run_id, root=Path(root))
        if run.final.exists():
            raise RunDirectoryError(f"run directory {run.final} already exists; runs are immutable")
        if run.staging.exists():
            shutil.rmtree(run.staging)
        run.staging.mkdir(parents=True)
        return run

    def path(self, name: str) -> Path:
        return self.staging / name

    def write_table(self, df: pd.DataFrame, name: str) -> Path:
        return atomic_write_table(df, self.path(name))

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self.path(name), obj)

    def write_npz(self, name: str, arrays: dict[str, np.ndarray]) -> Path:
        return write_npz(self.path(name), arrays)

    def file_hashes(self) -> dict[str, str]:
        """sha256 of every file of the staging folder but run.json (run.json's ``files``)."""
        return hashed_files(self.staging)

    def seal(self) -> None:
        """Record in run.json's ``files`` the sha256 of every file the staging folder holds now
        (the report and anything written after run.json included)."""
        if self.path(RUN_JSON).is_file():
            run = read_run_json(self.staging)
            run["files"] = self.file_hashes()
            atomic_write_json(self.path(RUN_JSON), run)

    def finish(self) -> Path:
        """Seal run.json, fsync the staging folder and rename it into place; the run is final
        afterwards."""
        if self.final.exists():
            raise RunDirectoryError(
                f"run directory {self.final} already exists; runs are immutable")
        self.seal()
        fd = os.open(self.staging, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.staging, self.final)
        return self.final


# ---- reading ----------------------------------------------------------------------------------


def hashed_files(run_dir: Path) -> dict[str, str]:
    """``{path relative to the run (POSIX): sha256}`` of every file of a run directory except
    run.json, sub-folders included, in sorted order."""
    root = Path(run_dir)
    found = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
    return {name: sha256_file(found[name]) for name in sorted(found) if name != RUN_JSON}


def read_run_json(run_dir: Path) -> dict[str, Any]:
    """``run.json`` of a run directory (finished, or staged and about to finish)."""
    path = Path(run_dir) / RUN_JSON
    if not path.is_file():
        raise RunDirectoryError(f"{run_dir} is not a run directory (no {RUN_JSON})")
    run = json.loads(path.read_text())
    if not isinstance(run, dict):
        raise RunDirectoryError(f"{path} does not hold a JSON object")
    return run


def read_table(folder: Path, stem: str) -> pd.DataFrame | None:
    """Table ``stem`` of a run or batch folder: Parquet when present, else CSV (an empty CSV is
    an empty table); None when neither exists."""
    folder = Path(folder)
    parquet, csv = folder / f"{stem}.parquet", folder / f"{stem}.csv"
    if parquet.is_file():
        return pd.read_parquet(parquet)
    if csv.is_file():
        try:
            return pd.read_csv(csv)
        except pd.errors.EmptyDataError:
            return pd.DataFrame()
    return None


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` (empty when absent)."""
    if not Path(path).is_file():
        return {}
    with np.load(path, allow_pickle=False) as npz:
        return {k: np.asarray(npz[k]) for k in npz.files}


def thumbnail_path(thumbs_dir: Path | None, image_key: str) -> Path | None:
    """The thumbnail of ``image_key`` under ``thumbs_dir`` (never a path outside it)."""
    if thumbs_dir is None or not thumbs_dir.is_dir():
        return None
    p = thumbs_dir / thumbnail_name(image_key)
    return p if p.is_file() and p.resolve().parent == thumbs_dir.resolve() else None


class SavedMaps:
    """Lazy access to a run's ``maps/<method>.npz`` arrays (keys: `saved_map_key`)."""

    def __init__(self, maps_dir: Path | None):
        self.maps_dir = maps_dir
        self._open: dict[str, object] = {}

    def available(self, method: str) -> bool:
        return self.maps_dir is not None and (self.maps_dir / f"{method}.npz").is_file()

    def get(self, method: str, image_key: str, findings: list[str]) -> np.ndarray | None:
        if not self.available(method):
            return None
        if method not in self._open:
            try:
                self._open[method] = np.load(self.maps_dir / f"{method}.npz", allow_pickle=False)
            except (OSError, ValueError):
                self._open[method] = None
        npz = self._open[method]
        if npz is None:
            return None
        for f in findings:
            k = saved_map_key(image_key, f)
            if k in npz.files:
                return np.asarray(npz[k], dtype=np.float32)
        return None

    def all(self, method: str) -> list[tuple[str, str, np.ndarray]]:
        """Every saved map of ``method`` as ``(image_key, finding, map)`` (empty when none)."""
        if not self.available(method):
            return []
        arrays = read_npz(self.maps_dir / f"{method}.npz")
        return [(*key.rsplit("|", 1), value) for key, value in sorted(arrays.items())]

    def close(self) -> None:
        for npz in self._open.values():
            if npz is not None:
                npz.close()
        self._open.clear()


@dataclass
class RunData:
    """Everything a finished run directory holds, read once."""

    run_dir: Path
    run: dict
    boxes: pd.DataFrame | None
    images: pd.DataFrame | None
    curves: pd.DataFrame | None
    predictions: pd.DataFrame | None
    per_pathology: pd.DataFrame | None
    paired: pd.DataFrame | None
    rejects: pd.DataFrame | None
    average_maps: dict[str, np.ndarray] = field(default_factory=dict)
    per_pathology_tp: pd.DataFrame | None = None

    @property
    def run_id(self) -> str:
        return str(self.run.get("run_id") or self.run_dir.name)

    @property
    def thumbs_dir(self) -> Path:
        return self.run_dir / "thumbs"

    @property
    def maps_dir(self) -> Path:
        return self.run_dir / "maps"

    @property
    def gallery_maps_path(self) -> Path | None:
        path = self.run_dir / GALLERY_MAPS
        return path if path.is_file() else None


def read_run(run_dir: Path) -> RunData:
    """Read a run directory through the one format (``per_pathology`` from its CSV)."""
    run_dir = Path(run_dir)
    return RunData(
        run_dir=run_dir,
        run=read_run_json(run_dir),
        boxes=read_table(run_dir, "boxes"),
        images=read_table(run_dir, "images"),
        curves=read_table(run_dir, "curves"),
        predictions=read_table(run_dir, "predictions"),
        per_pathology=read_table(run_dir, "per_pathology"),
        paired=read_table(run_dir, "paired"),
        rejects=read_table(run_dir, "rejects"),
        average_maps=read_npz(run_dir / "average_maps.npz"),
        per_pathology_tp=read_table(run_dir, PER_PATHOLOGY_TP.removesuffix(".csv")),
    )


def format_markdown() -> str:
    """The run-directory section of docs/interfaces.md, generated from this module."""
    lines = ["## Run directory (format: `audit/store/rundir.py`)", "",
             "Generated by `python -m audit.store.rundir`; do not edit by hand.", "", "```",
             "RUN_DIR/"]
    lines += [f"  {name:<20} {what}" for name, what in RUN_FILES.items()]
    lines += ["```", "", "Added to a finished run directory later (not sealed in run.json):", "",
              "```"]
    lines += [f"  {name:<20} {what}" for name, what in AFTER_FINISH.items()]
    lines += ["```", "", "A batch's result folder (under `OUT/.cache/batches/KEY/`):", "", "```"]
    lines += [f"  {name:<20} {what}" for name, what in BATCH_FILES.items()]
    lines += ["```", ""]
    for title, cols in (("boxes", BOX_COLUMNS), ("per_pathology", PER_PATHOLOGY_COLUMNS),
                        ("rejects", REJECT_COLUMNS)):
        lines.append(f"`{title}` columns: " + ", ".join(f"`{c}`" for c in cols) + ".")
        lines.append("")
    lines.append("Box geometry (`box_*`, `pred_*`) is in the image's original frame; `width`, "
                 "`height` are that frame's size. `iobb` is ChestX-ray8's IoBB (intersection "
                 "over the predicted box); `coverage` is the intersection over the expert box. "
                 "`verdict` is PASS, FAIL, INCONCLUSIVE or empty (no criterion applies); "
                 "`criteria` gives each criterion's value, CI, n and verdict; `n_needed` is, for "
                 "an INCONCLUSIVE row, the units that would make it decisive at the observed "
                 "rate (`inf`: never), approximate when `n_needed_approx`.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover - regenerates the docs section
    print(format_markdown(), end="")
