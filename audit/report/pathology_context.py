"""The context a pathology's numbers need (docs/report.md "Context beside each pathology"): box
sizes, the best IoU the CAM grid allows for them, the chance pointing rate, the model's AUROC and
how many boxed images it called positive, the true-positive subset's figures, and warnings for
maps that are mostly whole-image or empty.

Geometry only reads the boxes table (original frame), the model figures the predictions table,
the subset figures ``per_pathology_tp.csv``; nothing here rescored a map.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from audit.protocol import BASELINE_NAMES, NIH_FRAME_PX, POINTING_TOLERANCE_AT_1024
from audit.store.files import float_or_nan
from audit.store.rundir import CALLED_POSITIVE_AT

#: Class-activation methods and the downsampling of their feature map (DenseNet-121's
#: features.norm5: a 224 px input gives a 7 x 7 grid).
CAM_METHODS: tuple[str, ...] = ("gradcam", "gradcampp")
CAM_STRIDE = 32
#: A predicted box covering at least this share of the image counts as "whole image".
WHOLE_IMAGE_SHARE = 0.9
#: Warn when at least this share of a method's maps is whole-image, or empty / flat.
WARN_WHOLE_IMAGE = 0.5
WARN_EMPTY = 0.25


def cam_grid(image_size: int) -> tuple[int, float]:
    """The CAM feature grid of a ``image_size`` px input: (cells per side, px per cell on the
    1024 px frame)."""
    grid = max(1, int(image_size) // CAM_STRIDE)
    return grid, NIH_FRAME_PX / grid


def best_grid_iou(w: float, h: float, cell: float) -> float:
    """The best IoU any rectangle of whole grid cells (side ``cell``) can reach with a ``w x h``
    box, over every placement of the box: per axis the overlap is at most ``min(w, k * cell)``
    for ``k`` cells, reached when the box and the cells are aligned at a corner, so the bound is
    ``max over kx, ky >= 1 of I / (w h + kx ky cell^2 - I)`` with
    ``I = min(w, kx cell) min(h, ky cell)``."""
    if not (w > 0 and h > 0 and cell > 0):
        return math.nan
    best = 0.0
    for kx in range(1, int(math.ceil(w / cell)) + 2):
        for ky in range(1, int(math.ceil(h / cell)) + 2):
            inter = min(w, kx * cell) * min(h, ky * cell)
            best = max(best, inter / (w * h + kx * ky * cell * cell - inter))
    return best


def chance_pointing_share(boxes: list[tuple[float, float, float, float]], width: float,
                          height: float, tolerance: float, grid: int) -> float:
    """The share of a ``grid x grid`` map's pixel centres (covering the image) within
    ``tolerance`` of any of ``boxes`` (original frame): the pointing-game hit rate of a map whose
    maximum falls on a uniformly random pixel."""
    xs = (np.arange(grid) + 0.5) * width / grid
    ys = (np.arange(grid) + 0.5) * height / grid
    px, py = np.meshgrid(xs, ys)
    near = np.zeros(px.shape, dtype=bool)
    for x, y, w, h in boxes:
        dx = np.maximum(np.maximum(x - px, 0), px - (x + w))
        dy = np.maximum(np.maximum(y - py, 0), py - (y + h))
        near |= np.hypot(dx, dy) <= tolerance
    return float(near.mean())


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half); NaN without both classes."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = pd.Series(s).rank(method="average").to_numpy()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def with_frame(b: pd.DataFrame) -> pd.DataFrame:
    """The rows with ``width`` / ``height`` (the NIH 1024 px frame where a run did not record
    them)."""
    out = b.copy()
    for col in ("width", "height"):
        values = pd.to_numeric(out[col], errors="coerce") if col in out else np.nan
        out[col] = pd.Series(values, index=out.index, dtype=float).fillna(NIH_FRAME_PX)
    return out


def box_geometry(b: pd.DataFrame, image_size: int) -> dict[str, Any]:
    """Box sizes (median width x height in the original frame and scaled to the 1024 frame),
    mean box area share, the CAM grid's IoU ceiling for the median box and the chance pointing
    rate; ``b``: one pathology's box rows (any method)."""
    b = with_frame(b)
    units = b.drop_duplicates(["image_key", "box_index"])
    w, h = units["box_w"].astype(float), units["box_h"].astype(float)
    fw, fh = units["width"].astype(float), units["height"].astype(float)
    scale = NIH_FRAME_PX / np.sqrt(fw * fh)
    med_w, med_h = float((w * scale).median()), float((h * scale).median())
    grid, cell = cam_grid(image_size)
    shares = []
    for _, g in b.drop_duplicates(["image_key", "model_finding", "box_index"]).groupby(
            ["image_key", "model_finding"], sort=False):
        width, height = float(g["width"].iloc[0]), float(g["height"].iloc[0])
        tol = POINTING_TOLERANCE_AT_1024 * math.sqrt(width * height) / NIH_FRAME_PX
        rects = [tuple(map(float, r)) for r in g[["box_x", "box_y", "box_w", "box_h"]].to_numpy()]
        shares.append(chance_pointing_share(rects, width, height, tol, image_size))
    return {
        "n_boxes": len(units), "median_w": med_w, "median_h": med_h,
        "area_share": float((w * h / (fw * fh)).mean()),
        "grid": grid, "cell": cell, "ceiling": best_grid_iou(med_w, med_h, cell),
        "chance": float(np.mean(shares)) if shares else math.nan,
        "tolerance": POINTING_TOLERANCE_AT_1024,
    }


def model_figures(predictions: pd.DataFrame | None, b: pd.DataFrame) -> dict[str, Any]:
    """AUROC of the finding over the labelled images, and how many boxed images the model called
    positive (probability >= `CALLED_POSITIVE_AT`)."""
    finding = str(b["model_finding"].iloc[0])
    boxed = b.drop_duplicates("image_key")
    called = int((pd.to_numeric(boxed["probability"], errors="coerce") >= CALLED_POSITIVE_AT).sum())
    out: dict[str, Any] = {"finding": finding, "called": called, "n_boxed": len(boxed),
                           "at": CALLED_POSITIVE_AT, "auroc": math.nan, "n_pos": 0, "n_neg": 0}
    if predictions is not None and not predictions.empty and "label" in predictions:
        p = predictions[(predictions["finding"].astype(str) == finding)
                        & predictions["label"].notna()]
        y = p["label"].astype(float).to_numpy() > 0.5
        out.update(auroc=auroc(y, p["probability"].to_numpy(dtype=float)),
                   n_pos=int(y.sum()), n_neg=int((~y).sum()))
    return out


def map_warnings(b: pd.DataFrame, methods: list[str]) -> list[dict[str, Any]]:
    """Per method (baselines left out): the share of maps whose predicted box covers at least
    `WHOLE_IMAGE_SHARE` of the image, and of maps that are empty or flat; a warning when either
    reaches `WARN_WHOLE_IMAGE` / `WARN_EMPTY`. One map per image and finding."""
    out = []
    units = with_frame(b).drop_duplicates(["image_key", "model_finding", "method"])
    for m in methods:
        if m in BASELINE_NAMES:
            continue
        u = units[units["method"].astype(str) == m]
        if u.empty:
            continue
        area = (pd.to_numeric(u["pred_w"], errors="coerce")
                * pd.to_numeric(u["pred_h"], errors="coerce"))
        whole = int((area / (u["width"].astype(float) * u["height"].astype(float))
                     >= WHOLE_IMAGE_SHARE).sum())
        status = u["status"].astype(str) if "status" in u else pd.Series("ok", index=u.index)
        empty = int((status != "ok").sum())
        n = len(u)
        out.append({"method": m, "n": n, "whole": whole, "empty": empty,
                    "warn_whole": whole / n >= WARN_WHOLE_IMAGE,
                    "warn_empty": empty / n >= WARN_EMPTY})
    return out


def subset_rows(tp: pd.DataFrame | None, names: list[str], methods: list[str]) -> list[dict]:
    """The true-positive subset's pointing rate, mean IoU and n per method."""
    if tp is None or tp.empty or "pathology" not in tp:
        return []
    sub = tp[tp["pathology"].astype(str).isin(names)]
    by = {str(r["method"]): r for r in sub.to_dict("records")}
    return [{"method": m, **{k: float_or_nan(by[m].get(k)) for k in
                             ("n", "pointing_rate", "pointing_lo", "pointing_hi", "iou_mean",
                              "iou_mean_lo", "iou_mean_hi")}}
            for m in methods if m in by]
