"""Localization galleries: thumbnails with the saliency map overlaid and the boxes drawn.

Everything here reads only what a finished run directory holds (``thumbs/``, ``maps/``,
``average_maps.npz``, named as ``audit.store.rundir`` names them) and returns small inline images
as ``data:`` URIs. Nothing is recomputed: the boxes, scores and maps are the run's own.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from audit.store.files import float_or_nan
from audit.store.rundir import SavedMaps, thumbnail_path

GALLERY_SIZE = 192  # px, longest side of a gallery overlay
TILE_SIZE = 160  # px, side of an average-map tile
EXPERT_COLOUR = (0, 230, 64)
PRED_COLOUR = (0, 200, 255)
CASES = ("best", "median", "worst")
NIH_LONG_SIDE = 1024.0


def _colour_lut(name: str = "jet") -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


_LUT: dict[str, np.ndarray] = {}


def colour_lut(name: str = "jet") -> np.ndarray:
    if name not in _LUT:
        _LUT[name] = _colour_lut(name)
    return _LUT[name]


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def encode_image(img: Image.Image, fmt: str = "JPEG", quality: int = 82) -> str:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=True)
        return data_uri(buf.getvalue(), "image/jpeg")
    img.save(buf, format="PNG")
    return data_uri(buf.getvalue(), "image/png")


# ---- case selection -------------------------------------------------------------------------


def select_cases(boxes: pd.DataFrame, group_cols: tuple[str, ...] = ("finding", "method")):
    """Best, median and worst box per group by IoU (ties: IoBB, then image key, box index).

    A NaN IoU ranks below every number. Returns the chosen rows with a ``case`` column; a group
    with fewer than three boxes yields fewer distinct cases.
    """
    if boxes is None or boxes.empty:
        return pd.DataFrame(columns=[*boxes.columns, "case"] if boxes is not None else ["case"])
    df = boxes.copy()
    df["_iou"] = pd.to_numeric(df["iou"], errors="coerce").fillna(-1.0)
    iobb = df["iobb"] if "iobb" in df else pd.Series(0.0, index=df.index)
    df["_iobb"] = pd.to_numeric(iobb, errors="coerce").fillna(-1.0)
    bi = df["box_index"] if "box_index" in df else pd.Series(0, index=df.index)
    df["_bi"] = pd.to_numeric(bi, errors="coerce").fillna(0)
    df["_key"] = df["image_key"].astype(str)
    gcols = list(group_cols)
    df["_g"] = df.groupby(gcols, sort=False, dropna=False).ngroup()
    df = df.sort_values(["_g", "_iou", "_iobb", "_key", "_bi"],
                        ascending=[True, False, False, True, True], kind="mergesort")
    rank = df.groupby("_g", sort=False).cumcount().to_numpy()
    size = df.groupby("_g", sort=False)["_g"].transform("size").to_numpy()
    median = (size - 1) // 2
    case = np.full(len(df), "", dtype=object)
    case[rank == size - 1] = "worst"
    case[rank == median] = "median"
    case[rank == 0] = "best"
    df["case"] = case
    res = df[df["case"] != ""].drop(columns=["_iou", "_iobb", "_bi", "_key", "_g"])
    return res.reset_index(drop=True)


# ---- thumbnails and maps --------------------------------------------------------------------


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


# ---- drawing --------------------------------------------------------------------------------


def heat_rgb(arr: np.ndarray, size: tuple[int, int], cmap: str = "jet"):
    """Positive part of a map, scaled to its max, resized to ``size``; returns (rgb, alpha)."""
    a = np.nan_to_num(np.asarray(arr, dtype=np.float32), nan=0.0)
    a = np.maximum(a, 0)
    m = float(a.max()) if a.size else 0.0
    a = a / m if m > 0 else np.zeros_like(a)
    img = Image.fromarray(a.astype(np.float32), mode="F").resize(size, Image.BILINEAR)
    a = np.clip(np.asarray(img), 0, 1)
    rgb = colour_lut(cmap)[(a * 255).astype(np.uint8)]
    return rgb, a


def _draw_box(draw: ImageDraw.ImageDraw, box, sx: float, sy: float, colour, dashed=False):
    x, y, w, h = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return
    x0, y0, x1, y1 = x * sx, y * sy, (x + w) * sx, (y + h) * sy
    if not dashed:
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        return
    dash = 5
    for (ax, ay, bx, by) in ((x0, y0, x1, y0), (x1, y0, x1, y1), (x1, y1, x0, y1),
                             (x0, y1, x0, y0)):
        length = math.hypot(bx - ax, by - ay)
        steps = max(1, int(length // dash))
        for i in range(0, steps, 2):
            t0, t1 = i / steps, min(1.0, (i + 1) / steps)
            draw.line([ax + (bx - ax) * t0, ay + (by - ay) * t0,
                       ax + (bx - ax) * t1, ay + (by - ay) * t1], fill=colour, width=2)


def overlay_image(
    thumb: Image.Image | None,
    heat: np.ndarray | None,
    expert_box,
    pred_box,
    original_size: tuple[float, float],
    size: int = GALLERY_SIZE,
) -> Image.Image:
    """Thumbnail (or a grey canvas) with the map overlaid, expert box solid, predicted dashed."""
    ow, oh = original_size
    if thumb is not None:
        scale = size / max(thumb.size)
        tw, th = max(1, round(thumb.size[0] * scale)), max(1, round(thumb.size[1] * scale))
        base = thumb.convert("L").resize((tw, th), Image.LANCZOS).convert("RGB")
    else:
        scale = size / max(ow, oh)
        tw, th = max(1, round(ow * scale)), max(1, round(oh * scale))
        base = Image.new("RGB", (tw, th), (48, 48, 48))
    if heat is not None:
        rgb, a = heat_rgb(heat, (tw, th))
        # weak evidence (< 5% of the map's max) leaves the X-ray untinted; strong is 60% opaque
        alpha = (0.6 * np.clip((a - 0.05) / 0.45, 0, 1))[..., None]
        mixed = np.asarray(base, dtype=np.float32) * (1 - alpha) + rgb.astype(np.float32) * alpha
        base = Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(base)
    sx, sy = tw / ow, th / oh
    _draw_box(draw, pred_box, sx, sy, PRED_COLOUR, dashed=True)
    _draw_box(draw, expert_box, sx, sy, EXPERT_COLOUR)
    return base


@dataclass
class GalleryItem:
    case: str
    image_key: str
    finding: str
    method: str
    src: str
    probability: float
    iou: float
    iobb: float
    pointing_hit: object
    has_map: bool
    has_thumb: bool
    box_index: int


def gallery_items(
    cases: pd.DataFrame, thumbs_dir: Path | None, maps: SavedMaps, sizes: OriginalSizes
) -> list[GalleryItem]:
    items = []
    thumb_cache: dict[str, Image.Image | None] = {}
    for r in cases.to_dict("records"):
        key = str(r["image_key"])
        if key not in thumb_cache:
            p = thumbnail_path(thumbs_dir, key)
            try:
                thumb_cache[key] = Image.open(p).convert("L") if p is not None else None
            except OSError:
                thumb_cache[key] = None
        thumb = thumb_cache[key]
        findings = [str(r["finding"])]
        if r.get("model_finding") is not None and str(r.get("model_finding")) not in findings:
            findings.append(str(r["model_finding"]))
        heat = maps.get(str(r["method"]), key, findings)
        orig = sizes.get(key, thumb.size if thumb is not None else None)
        img = overlay_image(
            thumb,
            heat,
            (r["box_x"], r["box_y"], r["box_w"], r["box_h"]),
            (r.get("pred_x"), r.get("pred_y"), r.get("pred_w"), r.get("pred_h")),
            orig,
        )
        items.append(GalleryItem(
            case=r["case"], image_key=key, finding=str(r["finding"]), method=str(r["method"]),
            src=encode_image(img, "JPEG"),
            probability=float_or_nan(r.get("probability")), iou=float_or_nan(r.get("iou")),
            iobb=float_or_nan(r.get("iobb")), pointing_hit=r.get("pointing_hit"),
            has_map=heat is not None, has_thumb=thumb is not None,
            box_index=int(float_or_nan(r.get("box_index"))) if _finite(r.get("box_index")) else 0,
        ))
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
    rgb, _ = heat_rgb(arr, (size, size))
    return encode_image(Image.fromarray(rgb, mode="RGB"), "JPEG", quality=85)
