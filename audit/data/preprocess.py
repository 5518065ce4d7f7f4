"""Preprocessing for the model: intensity to torchxrayvision's range, resize, and box geometry.

Intensity: torchxrayvision's ``xrv.datasets.normalize(img, maxval)`` computes
``(img / maxval) * 2048 - 1024``, with ``maxval`` the nominal maximum of the file's bit depth (255
for its 8-bit PNGs). Here every image is scaled by its *nominal* range (`nominal_range`): the bit
depth of a PNG or DICOM, or the output range of a DICOM VOI window; for an 8-bit PNG this is
exactly torchxrayvision's value, whatever the image's own darkest and brightest pixels. Only
when no nominal range is known does the image's own min-max stand in.

Geometry: the image is resized (never cropped or padded) to ``size x size`` with bilinear
interpolation and antialiasing (``torch.nn.functional.interpolate``, deterministic on CPU), so a
non-square source is stretched and boxes scale with ``scale_x = size / W`` and
``scale_y = size / H`` (docs/interfaces.md: no rounding until drawing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

XRV_MIN = -1024.0
XRV_MAX = 1024.0

Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class PreprocessedImage:
    """``tensor``: float32 ``[1, size, size]`` in [-1024, 1024]; scales are new/old."""

    tensor: torch.Tensor
    scale_x: float
    scale_y: float
    original_size: Size

    @property
    def size(self) -> Size:
        """(width, height) of ``tensor``."""
        return int(self.tensor.shape[-1]), int(self.tensor.shape[-2])

    def boxes_to_model(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes from the original frame to the tensor's frame."""
        return scale_boxes(boxes, self.original_size, self.size)

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes from the tensor's frame back to the original frame."""
        return unscale_boxes(boxes, self.original_size, self.size)


def preprocess_settings(size: int = 224) -> dict[str, object]:
    """What `preprocess` does, as a dict: part of a cache key for preprocessed tensors."""
    return {
        "size": int(size),
        "intensity": "nominal range (PNG/DICOM bit depth, or the VOI window's output) to [0, 1], "
        "min-max when unknown; then * 2048 - 1024",
        "resize": "torch bilinear, antialias, align_corners=False, no crop",
        "version": 2,
    }


def nominal_range(pixels: np.ndarray, meta: dict) -> tuple[float, float] | None:
    """The range a decoded image's values are defined on, as torchxrayvision assumes it
    (``xrv.datasets.normalize(img, maxval)``): a VOI window's output range for windowed DICOM,
    else ``[0, 2**bits - 1]`` of the stored bit depth (8-bit PNG: 255). ``None`` when unknown or
    when the values fall outside it (e.g. a rescaled DICOM without a window): min-max then."""
    voi = str(meta.get("voi", "none"))
    if meta.get("source_format") == "dicom" and voi != "none":
        lo, hi = 0.0, 1.0
    else:
        bits = int(meta.get("bits_stored") or 8)
        lo, hi = 0.0, float(2 ** max(bits, 8) - 1)
    arr = np.asarray(pixels)
    if float(arr.min()) < lo or float(arr.max()) > hi:
        return None
    return lo, hi


def to_xrv_range(pixels: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Scale to [0, 1] by ``value_range`` (min-max when ``None``), then ``* 2048 - 1024``
    (float32). A constant input without a range is an error."""
    arr = np.array(pixels, dtype=np.float64)  # a copy: scaled in place below
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D gray image, got shape {arr.shape}")
    if value_range is None:
        lo, hi = float(arr.min()), float(arr.max())
    else:
        lo, hi = float(value_range[0]), float(value_range[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise ValueError("image is constant or not finite: cannot scale its range")
    # clip((arr - lo) / (hi - lo), 0, 1) * (XRV_MAX - XRV_MIN) + XRV_MIN: the same float64
    # operations in the same order, without a temporary array per step
    np.subtract(arr, lo, out=arr)
    np.divide(arr, hi - lo, out=arr)
    np.clip(arr, 0.0, 1.0, out=arr)
    np.multiply(arr, XRV_MAX - XRV_MIN, out=arr)
    np.add(arr, XRV_MIN, out=arr)
    return arr.astype(np.float32)


def preprocess(pixels: np.ndarray, size: int = 224,
               value_range: tuple[float, float] | None = None) -> PreprocessedImage:
    """A decoded (H, W) image -> `PreprocessedImage` (``[1, size, size]``, xrv range).

    ``value_range``: the nominal range of ``pixels`` (see `nominal_range`); min-max if ``None``.
    """
    scaled = to_xrv_range(pixels, value_range)
    h, w = scaled.shape
    t = torch.from_numpy(scaled)[None, None]
    if (h, w) != (size, size):
        t = F.interpolate(
            t, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        # The antialiasing filter's weights are non-negative, but float32 rounding can step a hair
        # outside the range (e.g. -1024.0002): keep the documented bounds exact.
        t = t.clamp(XRV_MIN, XRV_MAX)
    return PreprocessedImage(
        tensor=t[0].contiguous(),
        scale_x=size / w,
        scale_y=size / h,
        original_size=(int(w), int(h)),
    )


def scale_boxes(boxes: np.ndarray, from_size: Size, to_size: Size) -> np.ndarray:
    """Boxes ``[N, 4]`` (or one ``[4]``) ``x, y, w, h`` from a ``(W0, H0)`` frame to ``(W1, H1)``.

    ``x' = x * W1 / W0``, ``w' = w * W1 / W0``, same with heights for ``y, h``; float64, no
    rounding.
    """
    b = np.asarray(boxes, dtype=np.float64)
    if b.shape[-1] != 4:
        raise ValueError(f"boxes must have 4 columns (x, y, w, h), got shape {b.shape}")
    sx = to_size[0] / from_size[0]
    sy = to_size[1] / from_size[1]
    return b * np.array([sx, sy, sx, sy])


def unscale_boxes(boxes: np.ndarray, from_size: Size, to_size: Size) -> np.ndarray:
    """Inverse of ``scale_boxes(boxes, from_size, to_size)``: ``to_size`` frame -> ``from_size``."""
    return scale_boxes(boxes, to_size, from_size)


def box_pixel_bounds(box: np.ndarray, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Inclusive pixel index range ``(c0, r0, c1, r1)`` of the pixels inside a box.

    A pixel (column c, row r) is inside when its centre ``(c + 0.5, r + 0.5)`` lies in the closed
    box (docs/interfaces.md). Clipped to an image of ``shape = (H, W)``; ``None`` when no pixel
    centre is inside.
    """
    x, y, w, h = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(4))
    height, width = shape
    c0 = max(math.ceil(x - 0.5), 0)
    r0 = max(math.ceil(y - 0.5), 0)
    c1 = min(math.floor(x + w - 0.5), width - 1)
    r1 = min(math.floor(y + h - 0.5), height - 1)
    if c1 < c0 or r1 < r0:
        return None
    return c0, r0, c1, r1


def box_mask(box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` float64 mask: 1 on the pixels whose centre lies in the closed box (the pixels
    of `box_pixel_bounds`), 0 elsewhere."""
    mask = np.zeros(shape, dtype=np.float64)
    bounds = box_pixel_bounds(box, shape)
    if bounds is not None:
        c0, r0, c1, r1 = bounds
        mask[r0 : r1 + 1, c0 : c1 + 1] = 1.0
    return mask


def draw_box(
    image: np.ndarray, box: np.ndarray, value: float | Sequence[float], thickness: int = 1
) -> np.ndarray:
    """A copy of ``image`` with the outline of ``box`` drawn in ``value``.

    The outline is the border (``thickness`` pixels, inward) of the pixels whose centres lie in
    the box, i.e. the box rounded to pixel edges. Works for (H, W) and (H, W, C) images.
    """
    out = np.array(image, copy=True)
    bounds = box_pixel_bounds(box, out.shape[:2])
    if bounds is None:
        return out
    c0, r0, c1, r1 = bounds
    t = max(int(thickness), 1)
    out[r0 : min(r0 + t, r1 + 1), c0 : c1 + 1] = value
    out[max(r1 - t + 1, r0) : r1 + 1, c0 : c1 + 1] = value
    out[r0 : r1 + 1, c0 : min(c0 + t, c1 + 1)] = value
    out[r0 : r1 + 1, max(c1 - t + 1, c0) : c1 + 1] = value
    return out
