"""Localization of a saliency map against expert boxes: largest-component box, IoU, IoBB,
coverage.

Protocol (Grad-CAM paper / ChestX-ray8 style, see docs/metrics.md "Localization"):

1. Take the positive part of the map, ``max(map, 0)``, and divide by its maximum -> [0, 1].
2. Binarize: a pixel is "on" when its normalized value is ``>= threshold`` (default 0.15).
3. Keep the largest 8-connected component of the "on" pixels. Ties between components of
   equal pixel count: the one with the highest peak value of the normalized map (so the
   component that holds the map's global maximum wins); if still tied, the one whose first
   pixel comes first in raster order (row-major, top-left first).
4. Its bounding box in continuous coordinates (docs/interfaces.md): rows r0..r1 and columns
   c0..c1 give ``(x, y, w, h) = (c0, r0, c1 - c0 + 1, r1 - r0 + 1)``.
5. IoU, IoBB and coverage of that box P with each expert box G, computed on the continuous
   rectangles (no rasterization): ``IoU = |P n G| / |P u G|``; ``IoBB = |P n G| / |P|``, the
   intersection over the DETECTED (predicted) box's area exactly as ChestX-ray8 defines it
   (Wang et al. 2017, "similar to Area of Precision or Purity"), so a box over the whole image
   scores |G| / |image|, not 1; ``coverage = |P n G| / |G|``, the fraction of the expert box
   the prediction covers (a different quantity, never called IoBB).

Several boxes of the same finding: every metric takes its best value over the boxes
(``iou = max_j IoU_j``, ``iobb = max_j IoBB_j``, ``coverage = max_j coverage_j`` -- possibly
from different boxes), so a hit at T means "some expert box of this finding is matched at T".
``best_box_index`` is the box with the largest IoU (ties: larger IoBB, then lower index).

Uninformative maps -- every value <= 0 ("empty"), any non-finite value ("nonfinite"), or a
constant positive map ("flat") -- have no predicted box: IoU = 0, IoBB = 0, coverage = 0, no
hit, and a pointing-game miss. ``status`` records which case applied ("ok" otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage

from audit.metrics.maps import as_boxes, as_map, map_status
from audit.metrics.pointing import checked_batch, pointing_game_distances
from audit.protocol import DEFAULT_THRESHOLD, HIT_THRESHOLDS

__all__ = [
    "DEFAULT_THRESHOLD",
    "HIT_THRESHOLDS",
    "SWEEP_THRESHOLDS",
    "LocalizationResult",
    "as_boxes",
    "map_status",
    "normalized_positive",
    "binarize",
    "largest_component_mask",
    "largest_component_box",
    "box_intersection_area",
    "box_iou",
    "box_iobb",
    "box_coverage",
    "PredictedBox",
    "localize",
    "scores_against_boxes",
    "localization_scores",
    "localization_sweep",
    "localization_table",
]

#: 0.05, 0.10, ..., 0.95 (rounded to 2 decimals so that 0.15 is exactly the default).
SWEEP_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))

_EIGHT = np.ones((3, 3), dtype=bool)


def normalized_positive(saliency) -> np.ndarray | None:
    """``max(map, 0) / max`` in [0, 1], or ``None`` when the map is not "ok" (see map_status)."""
    m = as_map(saliency)
    if map_status(m) != "ok":
        return None
    pos = np.maximum(m, 0.0)
    return pos / pos.max()


def binarize(normalized, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Boolean mask ``normalized >= threshold``."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    return np.asarray(normalized) >= threshold


def largest_component_mask(mask, priority=None) -> np.ndarray:
    """The largest 8-connected component of ``mask`` (bool array of the same shape).

    Ties in pixel count: highest ``priority`` value inside the component (e.g. the map), then
    first in raster order. An all-false mask gives an all-false result.
    """
    mask = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return np.zeros_like(mask)
    return labels == _choose_component(labels, n, priority)


def _choose_component(labels: np.ndarray, n: int, priority) -> int:
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    candidates = np.flatnonzero(sizes == sizes.max()) + 1  # label ids, ascending = raster order
    if candidates.size == 1 or priority is None:
        return int(candidates[0])
    peaks = np.asarray(ndimage.maximum(np.asarray(priority), labels, index=candidates))
    return int(candidates[int(np.argmax(peaks))])  # argmax: first (raster) among equal peaks


def largest_component_box(saliency, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray | None:
    """Bounding box ``[x, y, w, h]`` of the largest component at ``threshold`` (None if no box)."""
    norm = normalized_positive(saliency)
    if norm is None:
        return None
    return _component_box(norm, threshold)


def _component_box(norm: np.ndarray, threshold: float) -> np.ndarray:
    mask = binarize(norm, threshold)
    labels, n = ndimage.label(mask, structure=_EIGHT)
    # n >= 1 always: the maximum (1.0) is >= any threshold in (0, 1].
    chosen = _choose_component(labels, n, norm)
    rows, cols = ndimage.find_objects(labels)[chosen - 1]
    return np.array(
        [cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start], dtype=np.float64
    )


def box_intersection_area(box, boxes) -> np.ndarray:
    """Area of the intersection of one box ``[4]`` with each of ``boxes [M, 4]`` -> ``[M]``."""
    a = np.asarray(box, dtype=np.float64).reshape(4)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(a[0] + a[2], b[:, 0] + b[:, 2]) - np.maximum(a[0], b[:, 0])
    ih = np.minimum(a[1] + a[3], b[:, 1] + b[:, 3]) - np.maximum(a[1], b[:, 1])
    return np.clip(iw, 0, None) * np.clip(ih, 0, None)


def box_iou(box, boxes) -> np.ndarray:
    """Intersection over union of one box with each of ``boxes`` -> ``[M]``."""
    a = np.asarray(box, dtype=np.float64).reshape(4)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    inter = box_intersection_area(a, b)
    return _ratio(inter, a[2] * a[3] + b[:, 2] * b[:, 3] - inter)


def box_iobb(pred_box, gt_boxes) -> np.ndarray:
    """ChestX-ray8 IoBB of one predicted box with each expert box -> ``[M]``: the intersection
    over the area of the DETECTED (predicted) box (Wang et al. 2017), ``|P n G_j| / |P|``."""
    p = np.asarray(pred_box, dtype=np.float64).reshape(4)
    inter = box_intersection_area(p, gt_boxes)
    return _ratio(inter, np.full_like(inter, p[2] * p[3]))


def box_coverage(pred_box, gt_boxes) -> np.ndarray:
    """Fraction of each expert box covered by the predicted box, ``|P n G_j| / |G_j|`` ->
    ``[M]`` (intersection over the expert box's area; not ChestX-ray8's IoBB)."""
    b = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    return _ratio(box_intersection_area(pred_box, b), b[:, 2] * b[:, 3])


def _ratio(inter: np.ndarray, area: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(area > 0, inter / area, 0.0)


@dataclass
class LocalizationResult:
    """Scores of one map against the boxes of one finding.

    ``iou_per_box``/``iobb_per_box``/``coverage_per_box``: per expert box; ``iou``/``iobb``/
    ``coverage``: best over the boxes; ``hits``: ``{"iou_hit_0.1": bool, ..., "iobb_hit_0.5":
    bool}``; ``pred_box`` is ``None`` when the map is not "ok".
    """

    status: str
    threshold: float
    pred_box: np.ndarray | None
    iou_per_box: np.ndarray
    iobb_per_box: np.ndarray
    iou: float
    iobb: float
    best_box_index: int
    hits: dict[str, bool] = field(default_factory=dict)
    coverage_per_box: np.ndarray = field(default_factory=lambda: np.zeros(0))
    coverage: float = 0.0

    def box_scores(self, j: int, hit_thresholds: Sequence[float] = HIT_THRESHOLDS) -> dict:
        """``{"iou", "iobb", "coverage", hits...}`` of expert box ``j`` alone."""
        iou_j, iobb_j = float(self.iou_per_box[j]), float(self.iobb_per_box[j])
        return {"iou": iou_j, "iobb": iobb_j, "coverage": float(self.coverage_per_box[j]),
                **_hit_dict(iou_j, iobb_j, hit_thresholds)}


def _hit_dict(iou: float, iobb: float, hit_thresholds: Sequence[float]) -> dict[str, bool]:
    out = {}
    for t in hit_thresholds:
        out[f"iou_hit_{t:g}"] = bool(iou >= t)
    for t in hit_thresholds:
        out[f"iobb_hit_{t:g}"] = bool(iobb >= t)
    return out


def _best_index(iou: np.ndarray, iobb: np.ndarray) -> int:
    if iou.size == 0:
        return -1
    # lexsort: last key is primary. Max IoU, then max IoBB, then lowest index.
    order = np.lexsort((np.arange(iou.size), -iobb, -iou))
    return int(order[0])


def _score(
    pred_box: np.ndarray | None,
    boxes: np.ndarray,
    status: str,
    threshold: float,
    hit_thresholds: Sequence[float],
) -> LocalizationResult:
    if pred_box is None or boxes.shape[0] == 0:
        iou_b = iobb_b = cov_b = np.zeros(boxes.shape[0])
    else:
        iou_b = box_iou(pred_box, boxes)
        iobb_b = box_iobb(pred_box, boxes)
        cov_b = box_coverage(pred_box, boxes)
    iou = float(iou_b.max()) if iou_b.size else 0.0
    iobb = float(iobb_b.max()) if iobb_b.size else 0.0
    return LocalizationResult(
        status=status,
        threshold=float(threshold),
        pred_box=pred_box,
        iou_per_box=iou_b,
        iobb_per_box=iobb_b,
        iou=iou,
        iobb=iobb,
        best_box_index=_best_index(iou_b, iobb_b),
        hits=_hit_dict(iou, iobb, hit_thresholds),
        coverage_per_box=cov_b,
        coverage=float(cov_b.max()) if cov_b.size else 0.0,
    )


@dataclass
class PredictedBox:
    """The map's predicted region at one threshold: ``box`` ``[x, y, w, h]`` or ``None``."""

    box: np.ndarray | None
    status: str
    threshold: float


def localize(saliency, threshold: float = DEFAULT_THRESHOLD) -> PredictedBox:
    """Predicted box of one map ``[H, W]`` (largest component at ``threshold``), with status."""
    status = map_status(saliency)
    norm = normalized_positive(saliency) if status == "ok" else None
    box = _component_box(norm, threshold) if norm is not None else None
    return PredictedBox(box=box, status=status, threshold=float(threshold))


def scores_against_boxes(
    predicted: PredictedBox,
    boxes,
    hit_thresholds: Sequence[float] = HIT_THRESHOLDS,
) -> list[dict]:
    """Per expert box: ``{"iou", "iobb", "coverage", "iou_hit_T"..., "iobb_hit_T"...}`` (zeros
    and no hits when there is no predicted box)."""
    b = as_boxes(boxes)
    r = _score(predicted.box, b, predicted.status, predicted.threshold, hit_thresholds)
    return [r.box_scores(j, hit_thresholds) for j in range(b.shape[0])]


def localization_scores(
    saliency,
    boxes,
    threshold: float = DEFAULT_THRESHOLD,
    hit_thresholds: Sequence[float] = HIT_THRESHOLDS,
) -> LocalizationResult:
    """Score one map ``[H, W]`` against the expert boxes ``[M, 4]`` (map frame) of one finding:
    per-box IoU/IoBB/coverage, their best values over the boxes, hits and ``best_box_index``."""
    pred = localize(saliency, threshold)
    return _score(pred.box, as_boxes(boxes), pred.status, threshold, hit_thresholds)


def localization_sweep(
    saliency,
    boxes,
    thresholds: Sequence[float] = SWEEP_THRESHOLDS,
    hit_thresholds: Sequence[float] = HIT_THRESHOLDS,
) -> pd.DataFrame:
    """One row per threshold: ``threshold, status, pred_x, pred_y, pred_w, pred_h, pred_area,
    iou, iobb, coverage, best_box_index`` and the hit columns."""
    b = as_boxes(boxes)
    status = map_status(saliency)
    norm = normalized_positive(saliency) if status == "ok" else None
    rows = []
    for t in thresholds:
        pred = _component_box(norm, t) if norm is not None else None
        r = _score(pred, b, status, t, hit_thresholds)
        rows.append(_row_of(r))
    return pd.DataFrame(rows)


def _row_of(r: LocalizationResult) -> dict:
    p = r.pred_box if r.pred_box is not None else np.full(4, np.nan)
    row = {
        "threshold": r.threshold,
        "status": r.status,
        "pred_x": p[0],
        "pred_y": p[1],
        "pred_w": p[2],
        "pred_h": p[3],
        "pred_area": float(p[2] * p[3]) if r.pred_box is not None else 0.0,
        "iou": r.iou,
        "iobb": r.iobb,
        "coverage": r.coverage,
        "best_box_index": r.best_box_index,
    }
    row.update(r.hits)
    return row


def localization_table(
    maps,
    boxes_per_map: Sequence,
    threshold: float = DEFAULT_THRESHOLD,
    tolerance_px: float | None = None,
    hit_thresholds: Sequence[float] = HIT_THRESHOLDS,
) -> pd.DataFrame:
    """Batched scoring: one row per (map, expert box).

    ``maps``: ``[N, H, W]``; ``boxes_per_map[i]``: ``[M_i, 4]`` boxes of map i's finding in the
    map's frame (``M_i = 0`` emits no row). ``tolerance_px`` for the pointing game defaults to
    15 px at 1024 scaled to the map's width (``pointing_tolerance_px``).

    Columns: ``map_index, box_index, box_x, box_y, box_w, box_h, status, threshold, pred_x,
    pred_y, pred_w, pred_h, iou, iobb, coverage, iou_hit_T..., iobb_hit_T..., pointing_hit,
    pointing_distance, best_match``. Per row, ``iou``/``iobb``/``coverage``/hits and
    ``pointing_hit`` (within tolerance) refer to that one box. ``best_match`` marks the row with
    the largest IoU of its map (ties: larger IoBB, lower box index). Aggregation collapses the
    rows of a finding with ``aggregation.collapse_boxes`` (max over boxes, pointing = any box).
    """
    maps, tolerance_px = checked_batch(maps, boxes_per_map, tolerance_px)
    rows = []
    for i in range(maps.shape[0]):
        b = as_boxes(boxes_per_map[i])
        if b.shape[0] == 0:
            continue
        r = localization_scores(maps[i], b, threshold, hit_thresholds)
        dist = pointing_game_distances(maps[i], b)
        p = r.pred_box if r.pred_box is not None else np.full(4, np.nan)
        for j in range(b.shape[0]):
            row = {
                "map_index": i,
                "box_index": j,
                "box_x": b[j, 0],
                "box_y": b[j, 1],
                "box_w": b[j, 2],
                "box_h": b[j, 3],
                "status": r.status,
                "threshold": float(threshold),
                "pred_x": p[0],
                "pred_y": p[1],
                "pred_w": p[2],
                "pred_h": p[3],
                **r.box_scores(j, hit_thresholds),
            }
            row["pointing_hit"] = bool(np.isfinite(dist[j]) and dist[j] <= tolerance_px)
            row["pointing_distance"] = float(dist[j])
            row["best_match"] = j == r.best_box_index
            rows.append(row)
    return pd.DataFrame(rows)
