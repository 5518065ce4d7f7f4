"""Pointing game (Zhang et al. 2016/2018): does the map's maximum fall on the expert box?

Definition used here (docs/metrics.md "Pointing game"):

* The point is the centre ``(c + 0.5, r + 0.5)`` of a pixel holding the map's maximum
  (docs/interfaces.md coordinates).
* Its distance to a box is the Euclidean distance from the point to the closed rectangle
  (0 when inside or on the edge). A hit is ``distance <= tolerance_px`` for at least one box
  of the finding.
* The tolerance is 15 px at the 1024-px NIH frame scaled to the map's frame:
  ``tolerance_px = 15 * map_size / 1024`` (3.28125 px for a 224 map), see
  ``pointing_tolerance_px``.
* Ties in the maximum (several pixels with exactly the maximal value): the map "points" at
  every one of them and the game is a hit when ANY of them is within the tolerance -- the
  convention of Quantus ``PointingGame`` (``a == a.max()`` then ``any(mask & max)``) and of
  TorchRay's "acceptance region collides with the mask". ``ties="first"`` (first maximum in
  raster order, ``np.argmax``) and ``ties="all"`` (every maximum must be within tolerance)
  are available for sensitivity checks.
* Uninformative maps (``map_status`` not "ok": all <= 0, non-finite, or constant) point
  nowhere: a miss, distance ``nan``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from audit.metrics.maps import as_boxes, as_map, map_status
from audit.protocol import POINTING_TOLERANCE_AT_1024

__all__ = [
    "POINTING_TOLERANCE_AT_1024",
    "pointing_tolerance_px",
    "max_pixel_centres",
    "point_box_distance",
    "pointing_game_distances",
    "pointing_game_distance",
    "pointing_game_hit",
    "pointing_table",
]

Ties = Literal["any", "first", "all"]


def pointing_tolerance_px(
    map_size,
    frame_size=1024,
    tolerance_at_frame: float = POINTING_TOLERANCE_AT_1024,
) -> float:
    """Tolerance in map pixels: ``tolerance_at_frame * map_size / frame_size``.

    Sizes are scalars (square frames) or ``(W, H)`` pairs; for non-square pairs the geometric
    mean of the two scale factors is used (an isotropic tolerance).
    """
    ms = np.broadcast_to(np.asarray(map_size, dtype=np.float64), (2,))
    fs = np.broadcast_to(np.asarray(frame_size, dtype=np.float64), (2,))
    scale = float(np.sqrt((ms[0] / fs[0]) * (ms[1] / fs[1])))
    return float(tolerance_at_frame) * scale


def max_pixel_centres(saliency) -> np.ndarray:
    """Centres ``[P, 2]`` (x, y) of every pixel holding the maximum, in raster order.

    Empty ``[0, 2]`` when the map is not "ok" (see ``localization.map_status``).
    """
    m = as_map(saliency)
    if map_status(m) != "ok":
        return np.zeros((0, 2), dtype=np.float64)
    rows, cols = np.nonzero(m == m.max())  # row-major order = raster order
    return np.stack([cols + 0.5, rows + 0.5], axis=1).astype(np.float64)


def point_box_distance(points, boxes) -> np.ndarray:
    """Euclidean distance ``[P, M]`` from each point (x, y) to each closed box (0 inside)."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    px, py = p[:, 0:1], p[:, 1:2]
    dx = np.maximum(np.maximum(b[None, :, 0] - px, 0.0), px - (b[None, :, 0] + b[None, :, 2]))
    dy = np.maximum(np.maximum(b[None, :, 1] - py, 0.0), py - (b[None, :, 1] + b[None, :, 3]))
    return np.hypot(dx, dy)


def _select(points: np.ndarray, ties: Ties) -> np.ndarray:
    if ties == "first":
        return points[:1]
    if ties in ("any", "all"):
        return points
    raise ValueError(f"unknown ties rule {ties!r}")


def pointing_game_distances(saliency, boxes, ties: Ties = "any") -> np.ndarray:
    """Per box ``[M]``: distance from the map's maximum to the box (``nan`` if no point).

    ``ties="any"`` / ``"first"``: the smallest distance over the (selected) tied maxima;
    ``ties="all"``: the largest.
    """
    b = as_boxes(boxes)
    pts = _select(max_pixel_centres(saliency), ties)
    if pts.shape[0] == 0:
        return np.full(b.shape[0], np.nan)
    d = point_box_distance(pts, b)
    return d.max(axis=0) if ties == "all" else d.min(axis=0)


def pointing_game_distance(saliency, boxes, ties: Ties = "any") -> float:
    """Distance to the nearest box of the finding (``nan`` when the map points nowhere)."""
    b = as_boxes(boxes)
    pts = _select(max_pixel_centres(saliency), ties)
    if pts.shape[0] == 0 or b.shape[0] == 0:
        return float("nan")
    d = point_box_distance(pts, b).min(axis=1)  # per point: nearest box
    return float(d.max() if ties == "all" else d.min())


def pointing_game_hit(saliency, boxes, tolerance_px: float, ties: Ties = "any") -> bool:
    """True when the map's maximum lies within ``tolerance_px`` of some box (map pixels)."""
    if tolerance_px < 0:
        raise ValueError("tolerance_px must be >= 0")
    d = pointing_game_distance(saliency, boxes, ties)
    return bool(np.isfinite(d) and d <= tolerance_px)


def checked_batch(maps, boxes_per_map: Sequence, tolerance_px: float | None
                  ) -> tuple[np.ndarray, float]:
    """``maps`` as ``[N, H, W]`` with one box list per map, and the pointing tolerance (default:
    15 px at 1024 scaled to the maps' width)."""
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be [N, H, W], got {maps.shape}")
    if len(boxes_per_map) != maps.shape[0]:
        raise ValueError("boxes_per_map must have one entry per map")
    if tolerance_px is None:
        tolerance_px = pointing_tolerance_px(maps.shape[2])
    return maps, float(tolerance_px)


def pointing_table(
    maps,
    boxes_per_map: Sequence,
    tolerance_px: float | None = None,
    ties: Ties = "any",
) -> pd.DataFrame:
    """Batched pointing game: one row per map with ``map_index, status, hit, distance,
    n_tied_max, point_x, point_y`` (the first maximum in raster order, for display).

    ``tolerance_px`` defaults to ``pointing_tolerance_px(W)`` for maps ``[N, H, W]``.
    Maps whose box list is empty get ``hit = False`` and ``distance = nan``.
    """
    maps, tolerance_px = checked_batch(maps, boxes_per_map, tolerance_px)
    rows = []
    for i in range(maps.shape[0]):
        pts = max_pixel_centres(maps[i])
        d = pointing_game_distance(maps[i], boxes_per_map[i], ties)
        rows.append(
            {
                "map_index": i,
                "status": map_status(maps[i]),
                "hit": bool(np.isfinite(d) and d <= tolerance_px),
                "distance": d,
                "n_tied_max": int(pts.shape[0]),
                "point_x": float(pts[0, 0]) if len(pts) else np.nan,
                "point_y": float(pts[0, 1]) if len(pts) else np.nan,
                "tolerance_px": float(tolerance_px),
            }
        )
    return pd.DataFrame(rows)
