"""The DICOM grayscale display pipeline on pixel arrays, without pydicom: stored values ->
Modality LUT or rescale -> VOI LUT or window -> MONOCHROME1 inversion. Unit-tested with
hand-computed values; `audit.data.dicom` reads the parameters from a header and calls it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: VOI LUT functions the window step implements.
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


@dataclass(frozen=True)
class Lut:
    """A DICOM lookup table: ``first_mapped`` input value, entries, output bit depth."""

    first_mapped: int
    data: np.ndarray
    bits: int

    @property
    def out_range(self) -> tuple[float, float]:
        return 0.0, float(2**self.bits - 1)


@dataclass(frozen=True)
class GrayscaleParams:
    """Everything the grayscale display pipeline needs from a header."""

    photometric: str = "MONOCHROME2"
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    modality_lut: Lut | None = None
    voi_luts: tuple[Lut, ...] = ()
    windows: tuple[tuple[float, float], ...] = ()  # (center, width) pairs
    voi_function: str = "LINEAR"
    presentation_lut_shape: str | None = None


def apply_lut(values: np.ndarray, lut: Lut) -> np.ndarray:
    """Map values through a LUT: below ``first_mapped`` -> first entry, beyond the end -> last."""
    idx = np.rint(np.asarray(values, dtype=np.float64)) - lut.first_mapped
    idx = np.clip(idx, 0, len(lut.data) - 1).astype(np.int64)
    return lut.data[idx].astype(np.float64)


def rescale(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Modality rescale: ``stored * slope + intercept`` in float64."""
    return np.asarray(stored, dtype=np.float64) * float(slope) + float(intercept)


def window(
    values: np.ndarray,
    center: float,
    width: float,
    function: str = "LINEAR",
    out_range: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """VOI window per PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID) onto ``out_range``."""
    x = np.asarray(values, dtype=np.float64)
    y_min, y_max = out_range
    span = y_max - y_min
    c, w = float(center), float(width)
    if function == "LINEAR":
        if w < 1:
            raise ValueError("LINEAR window width must be >= 1")
        if w == 1:  # degenerate case of the standard's formula: a threshold at c - 0.5
            return np.where(x <= c - 0.5, y_min, y_max)
        y = ((x - (c - 0.5)) / (w - 1) + 0.5) * span + y_min
        y = np.where(x <= c - 0.5 - (w - 1) / 2, y_min, y)
        return np.where(x > c - 0.5 + (w - 1) / 2, y_max, y)
    if w <= 0:
        raise ValueError(f"{function} window width must be > 0")
    if function == "LINEAR_EXACT":
        y = ((x - c) / w + 0.5) * span + y_min
        return np.clip(y, y_min, y_max)
    if function == "SIGMOID":
        return span / (1.0 + np.exp(-4.0 * (x - c) / w)) + y_min
    raise ValueError(f"unknown VOI LUT function {function}")


def invert(values: np.ndarray, out_range: tuple[float, float]) -> np.ndarray:
    """Flip polarity over ``[lo, hi]``: ``lo + hi - v``."""
    lo, hi = out_range
    return lo + hi - np.asarray(values, dtype=np.float64)


def grayscale_pipeline(
    stored: np.ndarray, params: GrayscaleParams
) -> tuple[np.ndarray, dict[str, object]]:
    """stored -> Modality LUT -> VOI -> polarity; returns float64 values and what was applied."""
    info: dict[str, object] = {}
    warn: list[str] = []
    if params.modality_lut is not None:
        values = apply_lut(stored, params.modality_lut)
        info["modality_lut"] = "modality LUT sequence"
    else:
        values = rescale(stored, params.rescale_slope, params.rescale_intercept)
        if (params.rescale_slope, params.rescale_intercept) == (1.0, 0.0):
            info["modality_lut"] = "identity"
        else:
            info["modality_lut"] = (
                f"rescale slope={params.rescale_slope:g} intercept={params.rescale_intercept:g}"
            )

    out_range: tuple[float, float] | None = None
    if params.voi_luts:
        lut = params.voi_luts[0]
        values = apply_lut(values, lut)
        out_range = lut.out_range
        info["voi"] = f"VOI LUT 1 of {len(params.voi_luts)}"
        if len(params.voi_luts) > 1:
            warn.append(f"{len(params.voi_luts)} VOI LUTs in header: used the first")
    elif params.windows:
        c, w = params.windows[0]
        try:
            values = window(values, c, w, params.voi_function)
            out_range = (0.0, 1.0)
            info["voi"] = (
                f"window center={c:g} width={w:g} {params.voi_function} "
                f"(1 of {len(params.windows)})"
            )
            if len(params.windows) > 1:
                warn.append(f"{len(params.windows)} VOI windows in header: used the first")
        except ValueError:
            info["voi"] = "none (invalid window in header)"
            warn.append(f"invalid VOI window (center={c:g}, width={w:g}): not applied")
    else:
        info["voi"] = "none"
    if out_range is None:
        out_range = (float(np.min(values)), float(np.max(values)))

    shape = params.presentation_lut_shape
    inverted = params.photometric == "MONOCHROME1" or shape == "INVERSE"
    if params.photometric == "MONOCHROME1" and shape == "IDENTITY":
        warn.append("MONOCHROME1 with Presentation LUT Shape IDENTITY: inverted as MONOCHROME1")
    if inverted:
        values = invert(values, out_range)
    info["inverted"] = bool(inverted)
    info["voi_output_range"] = [float(out_range[0]), float(out_range[1])]
    info["warnings"] = warn
    return values, info
