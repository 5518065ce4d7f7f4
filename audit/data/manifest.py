"""Dataset manifests: scan an image folder, validate and hash every file, join the NIH boxes.

`ingest` writes three files into ``out_dir``:

- ``NAME.csv``: one row per accepted box (images without a box get one row with empty box
  fields), columns `MANIFEST_COLUMNS`, sorted by ``(image_key, finding, box_index)``. The file
  holds no timestamps and formats floats with Python's shortest round-trip ``repr``, so re-running
  on unchanged inputs gives a byte-identical file.
- ``NAME.rejects.csv``: ``path, image_key, finding, reason`` for every file that could not be used
  and every box that was refused. A refused box does not refuse its image.
- ``NAME.json``: provenance (counts, every image's sha256, the sha256 of both CSVs and of the
  source tables, the images folder, settings, creation time, tool version).

An image's key is its file name (the NIH ``Image Index``); ``box_index`` numbers an image's boxes
in the order of the box CSV, from 0, and so stays stable when other rows are refused.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pandas as pd

from audit.data.nih import default_bbox_csv, read_bbox_csv, read_labels_csv, to_model_finding
from audit.data.readers import DEFAULT_MAX_PIXELS, inspect_file, sniff_file
from audit.store.files import atomic_write_bytes, sha256_bytes, sha256_file
from audit.store.rundir import REJECT_COLUMNS

MANIFEST_COLUMNS = [
    "image_key",
    "path",
    "sha256",
    "source_format",
    "width",
    "height",
    "photometric",
    "pixel_spacing",
    "finding",
    "model_finding",
    "box_index",
    "box_x",
    "box_y",
    "box_w",
    "box_h",
    "labels",
]
log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".dcm", ".dicom")
"""Files with these extensions are always read (and rejected when bad); any other file is read
only when its first bytes look like PNG or DICOM (e.g. DICOMs named by UID, with no extension)."""
BOX_TOLERANCE_PX = 1.0
"""A box may reach this far past the image edge (float rounding in the NIH list)."""

REASON_MISSING = "listed in box CSV but missing on disk"
REASON_NON_POSITIVE = "non-positive box size"
REASON_OUTSIDE = "box outside image"
REASON_MALFORMED = "malformed box row in CSV"
REASON_DUPLICATE = "duplicate image key"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_INT_COLUMNS = ("width", "height", "box_index")
_FLOAT_COLUMNS = ("pixel_spacing", "box_x", "box_y", "box_w", "box_h")


@dataclass(frozen=True)
class IngestResult:
    """Where `ingest` wrote its files, and the headline counts."""

    manifest_csv: Path
    rejects_csv: Path
    json_path: Path
    n_images: int
    n_boxes: int
    n_rejects: int


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def tool_version() -> str:
    """``audit.__version__`` when defined, else the installed distribution's version."""
    import audit

    version = getattr(audit, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import version as dist_version

        return dist_version("cxr-audit")
    except Exception:  # noqa: BLE001 - not installed (e.g. run from a source tree)
        return "0+unknown"


def _format_cell(value: Any) -> str:
    """Stable text for a CSV cell: ints as ints, floats as shortest round-trip repr, None empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return repr(float(value))
    if hasattr(value, "item"):  # numpy scalar
        return _format_cell(value.item())
    return str(value)


def _csv_bytes(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_format_cell(v) for v in row])
    return buf.getvalue().encode("utf-8")


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0].strip()


# --------------------------------------------------------------------------------------------
# Scanning and reading
# --------------------------------------------------------------------------------------------
def scan_images(images_dir: str | os.PathLike[str]) -> tuple[list[Path], int]:
    """Image candidates under ``images_dir`` (recursive, sorted, relative) and the skip count.

    Hidden files and folders (name starting with ``.``) are ignored. A file with an image
    extension is always a candidate; any other file is one when its bytes sniff as PNG/DICOM.
    """
    root = Path(images_dir)
    found: list[Path] = []
    skipped = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = Path(dirpath) / name
            if not full.is_file():
                skipped += 1
            elif full.suffix.lower() in IMAGE_EXTENSIONS or sniff_file(full) is not None:
                found.append(full.relative_to(root))
            else:
                skipped += 1
    found.sort(key=lambda p: p.as_posix())
    return found, skipped


def _inspect_all(
    paths: Sequence[Path], workers: int, max_pixels: int, progress: bool, desc: str
) -> list[dict]:
    """`inspect_file` over ``paths`` (absolute), in a process pool when ``workers > 1``."""
    from tqdm.auto import tqdm

    results: list[dict | None] = [None] * len(paths)
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress)
    try:
        if workers <= 1 or len(paths) <= 1:
            for i, p in enumerate(paths):
                results[i] = inspect_file(p, max_pixels)
                bar.update(1)
        else:
            ctx = get_context("spawn")  # no fork of a parent that may hold threads and locks
            try:
                with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                    chunk = max(1, min(16, len(paths) // (8 * workers)))
                    read = functools.partial(inspect_file, max_pixels=max_pixels)
                    for i, res in enumerate(pool.map(read, paths, chunksize=chunk)):
                        results[i] = res
                        bar.update(1)
            except BrokenProcessPool:
                # Either a decoder crashed its worker (retry the unfinished files one process
                # each, so that only the file that kills its process is rejected), or worker
                # processes cannot start here at all (read the rest in this process).
                isolate = _pool_works(ctx)
                if not isolate:
                    log.warning("worker processes cannot start; reading files in this process")
                for i in (i for i, r in enumerate(results) if r is None):
                    if isolate:
                        results[i] = _inspect_isolated(paths[i], max_pixels, ctx)
                    else:
                        results[i] = inspect_file(paths[i], max_pixels)
                    bar.update(1)
    finally:
        bar.close()
    return [r for r in results if r is not None]


def _pool_works(ctx: Any) -> bool:
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            return pool.submit(abs, -1).result(timeout=120) == 1
    except Exception:  # noqa: BLE001 - any failure means the pool is unusable here
        return False


def _inspect_isolated(path: Path, max_pixels: int, ctx: Any) -> dict:
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            return pool.submit(inspect_file, path, max_pixels).result()
    except BrokenProcessPool:
        return {"sha256": None, "reason": "decoder crashed: the worker process died on this file"}


# --------------------------------------------------------------------------------------------
# Box validation
# --------------------------------------------------------------------------------------------
def box_problem(
    x: float,
    y: float,
    w: float,
    h: float,
    width: int,
    height: int,
    tolerance: float = BOX_TOLERANCE_PX,
) -> str | None:
    """Why a box ``(x, y, w, h)`` cannot be used on a ``width x height`` image, or ``None``."""
    coords = f"x={x:g} y={y:g} w={w:g} h={h:g}"
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return f"{REASON_MALFORMED}: expected four numbers"
    if w <= 0 or h <= 0:
        return f"{REASON_NON_POSITIVE}: {coords}"
    if x < -tolerance or y < -tolerance or x + w > width + tolerance or y + h > height + tolerance:
        return f"{REASON_OUTSIDE}: {coords} on a {width}x{height} image"
    return None


# --------------------------------------------------------------------------------------------
# Ingest
# --------------------------------------------------------------------------------------------
def ingest(
    images_dir: str | os.PathLike[str],
    bboxes_csv: str | os.PathLike[str] | None = None,
    labels_csv: str | os.PathLike[str] | None = None,
    name: str = "manifest",
    out_dir: str | os.PathLike[str] = "data_manifests",
    workers: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    missing_images: str | None = None,
    progress: bool = True,
) -> IngestResult:
    """Scan ``images_dir``, validate and hash every image, join boxes and labels, write files.

    ``bboxes_csv=None`` uses the full NIH list inside torchxrayvision (`default_bbox_csv`).
    ``missing_images``: what to do with box rows whose image is not on disk -- ``"reject"``
    (a rejects row each) or ``"ignore"`` (only counted in the JSON). The default is ``"reject"``
    for an explicitly given box CSV and ``"ignore"`` for the default full list, where a folder
    usually holds a subset. ``workers <= 1`` reads in this process.
    """
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid manifest name {name!r}: use letters, digits, '.', '_', '-'")
    images_root = Path(images_dir)
    if not images_root.is_dir():
        raise NotADirectoryError(f"images_dir is not a directory: {images_root}")
    default_boxes = bboxes_csv is None
    box_path = Path(default_bbox_csv() if default_boxes else bboxes_csv)  # type: ignore[arg-type]
    if missing_images is None:
        missing_images = "ignore" if default_boxes else "reject"
    if missing_images not in ("reject", "ignore"):
        raise ValueError("missing_images must be 'reject' or 'ignore'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    boxes = read_bbox_csv(box_path, on_bad_row="nan")
    boxes["box_index"] = boxes.groupby("image_key", sort=False).cumcount()
    labels: dict[str, str] = {}
    if labels_csv is not None:
        table = read_labels_csv(labels_csv)
        labels = {k: "|".join(v) for k, v in zip(table["image_key"], table["labels"], strict=True)}

    rel_paths, n_skipped = scan_images(images_root)
    results = _inspect_all(
        [images_root / p for p in rel_paths], workers, max_pixels, progress, f"ingest {name}"
    )

    rejects: list[tuple[str, str, str, str]] = []
    images: dict[str, dict[str, Any]] = {}  # key -> accepted image record
    seen: dict[str, str] = {}  # key -> first relative path with that key
    for rel, res in zip(rel_paths, results, strict=True):
        rel_s, key = rel.as_posix(), rel.name
        if key in seen:
            rejects.append((rel_s, key, "", f"{REASON_DUPLICATE}: same file name as {seen[key]}"))
            continue
        seen[key] = rel_s
        if "reason" in res:
            rejects.append((rel_s, key, "", res["reason"]))
            continue
        images[key] = {"path": rel_s, "sha256": res["sha256"], "meta": res["meta"]}

    manifest_rows: list[tuple] = []
    boxed: set[str] = set()
    n_ignored = 0
    n_dropped_with_image = 0
    for row in boxes.itertuples(index=False):
        key, finding = row.image_key, row.finding
        image = images.get(key)
        if image is None:
            if key in seen:  # on disk but rejected: the image's own reject row says why
                n_dropped_with_image += 1
            elif missing_images == "reject":
                rejects.append(("", key, finding, REASON_MISSING))
            else:
                n_ignored += 1
            continue
        meta = image["meta"]
        problem = box_problem(row.x, row.y, row.w, row.h, meta["width"], meta["height"])
        if not finding:
            problem = f"{REASON_MALFORMED}: empty finding label"
        if problem is not None:
            rejects.append((image["path"], key, finding, problem))
            continue
        boxed.add(key)
        manifest_rows.append(_manifest_row(key, image, labels, finding, int(row.box_index), row))
    for key, image in images.items():
        if key not in boxed:
            manifest_rows.append(_manifest_row(key, image, labels, None, None, None))

    col = {c: i for i, c in enumerate(MANIFEST_COLUMNS)}
    manifest_rows.sort(
        key=lambda r: (
            r[col["image_key"]],
            r[col["finding"]] or "",
            -1 if r[col["box_index"]] is None else r[col["box_index"]],
        )
    )
    rejects.sort()
    manifest_bytes = _csv_bytes(MANIFEST_COLUMNS, manifest_rows)
    rejects_bytes = _csv_bytes(REJECT_COLUMNS, rejects)

    manifest_csv = out / f"{name}.csv"
    rejects_csv, json_path = rejects_path(manifest_csv), sidecar_path(manifest_csv)
    atomic_write_bytes(manifest_csv, manifest_bytes)
    atomic_write_bytes(rejects_csv, rejects_bytes)

    n_boxes = sum(1 for r in manifest_rows if r[col["finding"]] is not None)
    findings = Counter(r[col["finding"]] for r in manifest_rows if r[col["finding"]] is not None)
    model_findings = Counter(
        r[col["model_finding"]] for r in manifest_rows if r[col["model_finding"]] is not None
    )
    warnings_by_key = {k: v["meta"]["warnings"] for k, v in images.items() if v["meta"]["warnings"]}
    sidecar = {
        "name": name,
        "tool": "cxr-audit",
        "tool_version": tool_version(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "images_dir": str(images_root.resolve()),
        "manifest_csv": {"file": manifest_csv.name, "sha256": sha256_bytes(manifest_bytes)},
        "rejects_csv": {"file": rejects_csv.name, "sha256": sha256_bytes(rejects_bytes)},
        "sources": {
            "bboxes_csv": {
                "path": str(box_path.resolve()),
                "sha256": sha256_file(box_path),
                "default_list": default_boxes,
            },
            "labels_csv": None
            if labels_csv is None
            else {"path": str(Path(labels_csv).resolve()), "sha256": sha256_file(labels_csv)},
        },
        "settings": {
            "max_pixels": int(max_pixels),
            "missing_images": missing_images,
            "box_tolerance_px": BOX_TOLERANCE_PX,
        },
        "n_images": len(images),
        "n_images_with_boxes": len(boxed),
        "n_images_without_boxes": len(images) - len(boxed),
        "n_boxes": n_boxes,
        "n_rejects": len(rejects),
        "n_box_rows_in_csv": int(len(boxes)),
        "n_box_rows_ignored_missing_image": n_ignored,
        "n_box_rows_of_rejected_images": n_dropped_with_image,
        "n_files_skipped_not_images": n_skipped,
        "counts_per_finding": dict(sorted(findings.items())),
        "counts_per_model_finding": dict(sorted(model_findings.items())),
        "rejects_by_reason": dict(sorted(Counter(_reason_kind(r[3]) for r in rejects).items())),
        "image_warnings": dict(sorted(warnings_by_key.items())),
        "images": {k: images[k]["sha256"] for k in sorted(images)},
    }
    text = json.dumps(sidecar, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    atomic_write_bytes(json_path, text.encode("utf-8"))
    return IngestResult(
        manifest_csv=manifest_csv,
        rejects_csv=rejects_csv,
        json_path=json_path,
        n_images=len(images),
        n_boxes=n_boxes,
        n_rejects=len(rejects),
    )


def _manifest_row(
    key: str,
    image: dict[str, Any],
    labels: dict[str, str],
    finding: str | None,
    box_index: int | None,
    box: Any,
) -> tuple:
    meta = image["meta"]
    values = {
        "image_key": key,
        "path": image["path"],
        "sha256": image["sha256"],
        "source_format": meta["source_format"],
        "width": int(meta["width"]),
        "height": int(meta["height"]),
        "photometric": meta.get("photometric"),
        "pixel_spacing": meta.get("pixel_spacing"),
        "finding": finding,
        "model_finding": None if finding is None else to_model_finding(finding),
        "box_index": box_index,
        "box_x": None if box is None else float(box.x),
        "box_y": None if box is None else float(box.y),
        "box_w": None if box is None else float(box.w),
        "box_h": None if box is None else float(box.h),
        "labels": labels.get(key),
    }
    return tuple(values[c] for c in MANIFEST_COLUMNS)


# --------------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------------
def rejects_path(manifest_csv: str | os.PathLike[str]) -> Path:
    """``NAME.rejects.csv`` beside ``NAME.csv``."""
    return Path(str(manifest_csv).removesuffix(".csv") + ".rejects.csv")


def sidecar_path(manifest_csv: str | os.PathLike[str]) -> Path:
    """``NAME.json`` beside ``NAME.csv``."""
    return Path(manifest_csv).with_suffix(".json")


def read_sidecar(manifest_csv: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest's JSON sidecar (images folder, every file's sha256, counts)."""
    return json.loads(sidecar_path(manifest_csv).read_text())


def read_manifest(csv_path: str | os.PathLike[str]) -> pd.DataFrame:
    """Load a manifest CSV with proper dtypes.

    ``width, height, box_index``: Int64; ``pixel_spacing, box_*``: float64 (NaN when empty);
    text columns: str with missing values (NaN) where the cell is empty -- e.g. ``finding`` of an
    image without boxes.
    """
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, na_values=[])
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{csv_path}: not a manifest, missing columns {missing}")
    for c in df.columns:
        if c in _INT_COLUMNS:
            df[c] = pd.to_numeric(df[c].replace("", None)).astype("Int64")
        elif c in _FLOAT_COLUMNS:
            df[c] = pd.to_numeric(df[c].replace("", None)).astype("float64")
        else:
            df[c] = df[c].replace("", None)
    return df


def manifest_boxes(df: pd.DataFrame) -> pd.DataFrame:
    """Only the rows that carry a box."""
    return df[df["finding"].notna()].reset_index(drop=True)
