"""Input checks shared by every metric: a map is a finite-or-not 2-D array, boxes are
``[M, 4]`` (x, y, w, h) with positive sizes, and a map's status says whether it points anywhere.
(Its own module so that localization and pointing both import it, not each other.)"""

from __future__ import annotations

import numpy as np

__all__ = ["as_boxes", "as_map", "map_status"]


def as_boxes(boxes) -> np.ndarray:
    """Validate boxes -> float64 ``[M, 4]`` (x, y, w, h). A single box may be given as ``[4]``.

    Raises ``ValueError`` for non-finite values or a non-positive width/height.
    """
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim == 1 and b.shape[0] == 4:
        b = b[None, :]
    if b.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must have shape [M, 4], got {b.shape}")
    if not np.all(np.isfinite(b)):
        raise ValueError("boxes contain non-finite values")
    if np.any(b[:, 2] <= 0) or np.any(b[:, 3] <= 0):
        raise ValueError("boxes must have positive width and height")
    return b


def as_map(saliency) -> np.ndarray:
    m = np.asarray(saliency)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D map [H, W], got shape {m.shape}")
    if m.size == 0:
        raise ValueError("empty map array")
    return m.astype(np.float64, copy=False)


def map_status(saliency) -> str:
    """``"nonfinite"`` | ``"empty"`` (no positive value) | ``"flat"`` (constant > 0) | ``"ok"``."""
    m = as_map(saliency)
    if not np.all(np.isfinite(m)):
        return "nonfinite"
    top = m.max()
    if top <= 0:
        return "empty"
    if m.min() == top:
        return "flat"
    return "ok"
