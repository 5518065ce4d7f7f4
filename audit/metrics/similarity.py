"""Similarity between two saliency maps: SSIM, Spearman rank correlation, HOG similarity.

All functions take two 2-D arrays of the same shape and return a Python float.
Conventions for degenerate inputs (see docs/metrics.md, "Similarity"):

* A map with a non-finite value cannot be compared: the result is ``nan``.
* Correlations (Spearman, HOG/Pearson) are undefined when one side is constant. We define:
  both sides constant -> 1.0 (no structure on either side, nothing changed);
  exactly one side constant -> 0.0 (no association).
* SSIM is computed by scikit-image on maps normalized to [0, 1] (``normalize``), with
  ``data_range=1``, a uniform (non-Gaussian) ``win_size`` x ``win_size`` window (default 7,
  scikit-image's default), and the population covariance option left at scikit-image's default.
  Maps smaller than the window use the largest odd window that fits (minimum 3).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.stats import rankdata
from skimage.feature import hog
from skimage.metrics import structural_similarity

Normalization = Literal["minmax", "positive", "abs", "none"]

__all__ = [
    "normalize_unit",
    "pearson",
    "spearman",
    "ssim",
    "hog_descriptor",
    "hog_similarity",
]


def _as_pair(map_a, map_b) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(map_a, dtype=np.float64)
    b = np.asarray(map_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {a.shape} vs {b.shape}")
    if a.ndim != 2:
        raise ValueError(f"expected 2-D maps, got shape {a.shape}")
    return a, b


def normalize_unit(saliency, mode: Normalization = "minmax") -> np.ndarray:
    """Map to [0, 1] (float64).

    ``minmax``: (m - min) / (max - min); a constant map becomes all zeros.
    ``positive``: max(m, 0) / max; a map with no positive value becomes all zeros.
    ``abs``: |m| / max|m|; an all-zero map stays all zeros.
    ``none``: returned as float64 unchanged.
    Non-finite values propagate (callers check finiteness first).
    """
    m = np.asarray(saliency, dtype=np.float64)
    if mode == "none":
        return m.copy()
    if mode == "positive":
        m = np.maximum(m, 0.0)
        top = m.max() if m.size else 0.0
        return m / top if top > 0 else np.zeros_like(m)
    if mode == "abs":
        m = np.abs(m)
        top = m.max() if m.size else 0.0
        return m / top if top > 0 else np.zeros_like(m)
    if mode == "minmax":
        lo, hi = (m.min(), m.max()) if m.size else (0.0, 0.0)
        return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    raise ValueError(f"unknown normalization {mode!r}")


def _correlation_of(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two 1-D vectors with the constant-side conventions."""
    const_a = bool(np.all(a == a[0])) if a.size else True
    const_b = bool(np.all(b == b[0])) if b.size else True
    if const_a and const_b:
        return 1.0
    if const_a or const_b:
        return 0.0
    a = a - a.mean()
    b = b - b.mean()
    r = float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))
    return float(np.clip(r, -1.0, 1.0))


def pearson(x, y) -> float:
    """Pearson correlation of two equally long arrays (flattened); conventions as above."""
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"lengths differ: {a.shape} vs {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    return _correlation_of(a, b)


def spearman(map_a, map_b, absolute: bool = False) -> float:
    """Spearman rank correlation of two maps (all pixels; ties get average ranks).

    ``absolute=True`` correlates |map_a| with |map_b| (Adebayo et al. 2018 report both).
    Equals ``scipy.stats.spearmanr`` on the flattened maps where that is defined.
    """
    a, b = _as_pair(map_a, map_b)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    if absolute:
        a, b = np.abs(a), np.abs(b)
    a, b = a.ravel(), b.ravel()
    const_a = bool(np.all(a == a[0]))
    const_b = bool(np.all(b == b[0]))
    if const_a or const_b:
        return _correlation_of(a, b)
    return _correlation_of(rankdata(a), rankdata(b))


def _window_for(shape: tuple[int, ...], win_size: int) -> int:
    side = min(shape)
    w = min(win_size, side if side % 2 == 1 else side - 1)
    if w < 3:
        raise ValueError(f"map {shape} too small for SSIM (needs at least 3x3)")
    return w


def ssim(map_a, map_b, normalize: Normalization = "minmax", win_size: int = 7) -> float:
    """Structural similarity (Wang et al. 2004) of two maps normalized to [0, 1].

    scikit-image ``structural_similarity(a, b, data_range=1, win_size=win_size)`` with its
    defaults otherwise (uniform window, K1=0.01, K2=0.03, sample covariance), i.e. the mean of
    the local SSIM over all window positions that fit in the map.
    """
    a, b = _as_pair(map_a, map_b)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    a = normalize_unit(a, normalize)
    b = normalize_unit(b, normalize)
    w = _window_for(a.shape, win_size)
    return float(structural_similarity(a, b, data_range=1.0, win_size=w))


def hog_descriptor(
    saliency,
    normalize: Normalization = "abs",
    orientations: int = 9,
    pixels_per_cell: tuple[int, int] = (16, 16),
    cells_per_block: tuple[int, int] = (2, 2),
) -> np.ndarray:
    """skimage HOG descriptor (L2-Hys block norm) of a map normalized to [0, 1]."""
    m = normalize_unit(np.asarray(saliency, dtype=np.float64), normalize)
    return hog(
        m,
        orientations=orientations,
        pixels_per_cell=pixels_per_cell,
        cells_per_block=cells_per_block,
        block_norm="L2-Hys",
        feature_vector=True,
    )


def hog_similarity(
    map_a,
    map_b,
    normalize: Normalization = "abs",
    orientations: int = 9,
    pixels_per_cell: tuple[int, int] = (16, 16),
    cells_per_block: tuple[int, int] = (2, 2),
) -> float:
    """Pearson correlation of the HOG descriptors of two maps (Adebayo et al. 2018)."""
    a, b = _as_pair(map_a, map_b)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    kw = dict(
        normalize=normalize,
        orientations=orientations,
        pixels_per_cell=pixels_per_cell,
        cells_per_block=cells_per_block,
    )
    return _correlation_of(hog_descriptor(a, **kw), hog_descriptor(b, **kw))
