"""Localization galleries: thumbnails with the saliency map overlaid and the boxes drawn.

Everything here reads only what a finished run directory holds (``thumbs/``,
``gallery_maps.npz`` or, for runs written before it existed, ``maps/``, and ``average_maps.npz``,
named as ``audit.store.rundir`` names them) and returns inline images as ``data:`` URIs. Nothing
is recomputed: the boxes, scores and maps are the run's own. Drawing: `audit.report.overlay`.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from audit.protocol import METHOD_LABELS
from audit.store.files import float_or_nan
from audit.store.gallery_maps import MAGNITUDE_METHODS, GalleryMaps, display_map, map_peak
from audit.store.rundir import SavedMaps, thumbnail_path

from .overlay import heat_rgb, overlay_image

TILE_SIZE = 160  # px, side of an average-map tile
NIH_LONG_SIDE = 1024.0
#: A relative completeness gap |sum(attr) - (F(x) - F(x'))| / |F(x) - F(x')| above this is
#: flagged as large (the attributions then do not add up to the logit change they explain).
COMPLETENESS_FLAG = 0.1


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def encode_image(img: Image.Image, fmt: str = "JPEG", quality: int = 80) -> str:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=True)
        return data_uri(buf.getvalue(), "image/jpeg")
    img.save(buf, format="PNG")
    return data_uri(buf.getvalue(), "image/png")


# ---- original sizes -------------------------------------------------------------------------


class OriginalSizes:
    """Original (width, height) of each image, for scaling original-frame boxes onto thumbnails.

    Sources: the ``width``/``height`` columns of the boxes table (the run writer records each
    image's original size on every box row), else the NIH convention (the long side is 1024 px,
    aspect ratio from the thumbnail), flagged as assumed.
    """

    def __init__(self, boxes: pd.DataFrame | None):
        self.sizes: dict[str, tuple[float, float]] = {}
        if boxes is not None and {"width", "height"} <= set(boxes.columns):
            for k, w, h in boxes[["image_key", "width", "height"]].drop_duplicates(
                "image_key"
            ).itertuples(index=False):
                if _finite(w) and _finite(h):
                    self.sizes[str(k)] = (float(w), float(h))
        self.assumed = False

    def get(self, key: str, thumb_size: tuple[int, int] | None) -> tuple[float, float]:
        if key in self.sizes:
            return self.sizes[key]
        self.assumed = True
        if thumb_size is None:
            return (NIH_LONG_SIDE, NIH_LONG_SIDE)
        tw, th = thumb_size
        s = NIH_LONG_SIDE / max(tw, th)
        return (tw * s, th * s)


def _finite(v) -> bool:
    return math.isfinite(float_or_nan(v))


# ---- maps and cases -------------------------------------------------------------------------


class MapSource:
    """A case's display map and maximum: from ``gallery_maps.npz``, else (runs written before
    it) from ``maps/`` converted the same way (`audit.store.gallery_maps`)."""

    def __init__(self, gallery: GalleryMaps, saved: SavedMaps):
        self.gallery, self.saved = gallery, saved

    def get(self, method: str, key: str, findings: list[str], original: tuple[float, float]
            ) -> tuple[np.ndarray, np.ndarray] | None:
        found = self.gallery.get(method, key, findings)
        if found is not None:
            return found
        raw = self.saved.get(method, key, findings)
        if raw is None:
            return None
        x, y, n = map_peak(np.clip(raw, 0, None))
        h, w = raw.shape
        peak = np.array([x * original[0] / w, y * original[1] / h, n], dtype=np.float32)
        return display_map(method, raw), peak

    def close(self) -> None:
        self.saved.close()


@dataclass
class GalleryItem:
    case: str
    anchor: str
    image_key: str
    finding: str
    method: str
    src: str
    probability: float
    iou: float
    iobb: float
    pointing_hit: bool
    pointing_distance: float
    is_hit: bool
    has_map: bool
    has_thumb: bool
    box_index: int
    n_tied: int
    magnitude: bool
    completeness_rel: float

    @property
    def completeness_flag(self) -> bool:
        return math.isfinite(self.completeness_rel) and self.completeness_rel > COMPLETENESS_FLAG


def completeness_lookup(images: pd.DataFrame | None) -> dict[tuple[str, str, str], float]:
    """Relative completeness gap per (image_key, finding, method) from the images table."""
    if images is None or not {"completeness_gap", "delta_f"} <= set(images.columns):
        return {}
    gap = pd.to_numeric(images["completeness_gap"], errors="coerce").abs()
    df = pd.to_numeric(images["delta_f"], errors="coerce").abs()
    rel = (gap / df.where(df > 0)).to_numpy()
    keys = images[["image_key", "finding", "method"]].astype(str).itertuples(index=False)
    return {tuple(k): float(r) for k, r in zip(keys, rel, strict=True) if math.isfinite(r)}


def _thumb(cache: dict[str, Image.Image | None], thumbs_dir: Path | None, key: str):
    if key not in cache:
        p = thumbnail_path(thumbs_dir, key)
        try:
            cache[key] = Image.open(p).convert("L") if p is not None else None
        except OSError:
            cache[key] = None
    return cache[key]


def _is_true(v) -> bool:
    return str(v).lower() in ("true", "1", "1.0")


def gallery_items(cases: pd.DataFrame, thumbs_dir: Path | None, maps: MapSource,
                  sizes: OriginalSizes, completeness: dict[tuple[str, str, str], float],
                  anchor_prefix: str) -> list[GalleryItem]:
    """One overlay per chosen case (`audit.report.cases.select_cases`)."""
    items = []
    thumbs: dict[str, Image.Image | None] = {}
    for i, r in enumerate(cases.to_dict("records")):
        key, method = str(r["image_key"]), str(r["method"])
        thumb = _thumb(thumbs, thumbs_dir, key)
        findings = list(dict.fromkeys([str(r.get("model_finding") or r["finding"]),
                                       str(r["finding"])]))
        orig = sizes.get(key, thumb.size if thumb is not None else None)
        found = maps.get(method, key, findings, orig)
        magnitude = method in MAGNITUDE_METHODS
        label = METHOD_LABELS.get(method, method) + (" |attr|" if magnitude else "")
        img = overlay_image(
            thumb, found[0] if found else None,
            (r["box_x"], r["box_y"], r["box_w"], r["box_h"]),
            (r.get("pred_x"), r.get("pred_y"), r.get("pred_w"), r.get("pred_h")),
            tuple(found[1][:2]) if found else None, orig, label,
            bar_label="p99" if magnitude else "max")
        rel = completeness.get((key, findings[0], method), math.nan)
        items.append(GalleryItem(
            case=str(r["case"]), anchor=f"{anchor_prefix}-{i}", image_key=key,
            finding=str(r["finding"]), method=method, src=encode_image(img, "JPEG"),
            probability=float_or_nan(r.get("probability")), iou=float_or_nan(r.get("iou")),
            iobb=float_or_nan(r.get("iobb")), pointing_hit=_is_true(r.get("pointing_hit")),
            pointing_distance=float_or_nan(r.get("pointing_distance")),
            is_hit=bool(r.get("is_hit")), has_map=found is not None,
            has_thumb=thumb is not None,
            box_index=int(float_or_nan(r.get("box_index"))) if _finite(r.get("box_index")) else 0,
            n_tied=int(found[1][2]) if found else 0, magnitude=magnitude,
            completeness_rel=rel))
    return items


# ---- average maps ---------------------------------------------------------------------------


def average_map_tile(arr: np.ndarray, expert: bool = False, size: int = TILE_SIZE) -> str:
    """One average map as a PNG data URI (expert boxes in grey scale, saliency in colour)."""
    if expert:
        a = np.nan_to_num(np.asarray(arr, dtype=np.float32))
        m = float(a.max()) if a.size else 0.0
        a = a / m if m > 0 else a
        img = Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8), mode="L")
        img = img.resize((size, size), Image.BILINEAR)
        return encode_image(img, "PNG")
    a = np.clip(np.nan_to_num(np.asarray(arr, dtype=np.float32)), 0, None)
    m = float(a.max()) if a.size else 0.0
    rgb, _ = heat_rgb(a / m if m > 0 else a, (size, size))
    return encode_image(Image.fromarray(rgb, mode="RGB"), "JPEG", quality=85)
