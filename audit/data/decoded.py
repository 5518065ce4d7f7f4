"""What every reader returns and raises: `DecodedImage`, `RejectedInput`, the pixel limit, and the
checks and conversions shared by the PNG and DICOM decoders (so `png.py` and `dicom.py` depend
on this module, and `readers.py` on them: no import circle)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DEFAULT_MAX_PIXELS", "PNG_SIGNATURE", "DICOM_MAGIC", "DICOM_MAGIC_OFFSET",
           "RejectedInput", "DecodedImage", "check_not_empty", "rgb_to_gray"]

DEFAULT_MAX_PIXELS = 100_000_000
"""Largest Rows x Columns (or PNG width x height) that is decoded; checked from the header."""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DICOM_MAGIC = b"DICM"
DICOM_MAGIC_OFFSET = 128

class RejectedInput(Exception):
    """A file that cannot be used; ``reason`` says why in plain words (no header values)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class DecodedImage:
    """A decoded image: ``pixels`` float32 (H, W), bone bright; ``meta`` technical fields only."""

    pixels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


def check_not_empty(pixels: np.ndarray) -> None:
    """Reject decodes that carry no image: non-finite values, constant or all-zero arrays."""
    if pixels.ndim != 2 or pixels.size == 0:
        raise RejectedInput(f"empty decode: array of shape {tuple(pixels.shape)}")
    lo, hi = float(pixels.min()), float(pixels.max())  # NaN propagates; inf is an extreme
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise RejectedInput("empty decode: image contains non-finite values")
    if lo == hi:
        what = "all zero" if hi == 0 else "constant"
        raise RejectedInput(f"empty decode: image is {what}")


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of the first three channels (alpha ignored), float32 (H, W)."""
    c = rgb[..., :3].astype(np.float32)
    gray = 0.299 * c[..., 0] + 0.587 * c[..., 1] + 0.114 * c[..., 2]
    # Where R == G == B the luma must equal that value exactly (weights sum to 1 only
    # approximately in float32); keep gray pixels bit-exact.
    equal = (c[..., 0] == c[..., 1]) & (c[..., 1] == c[..., 2])
    return np.where(equal, c[..., 0], gray).astype(np.float32)
