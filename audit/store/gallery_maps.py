"""The gallery's map store: every map of a batch kept small enough to show later, whether or not
the run saves its maps (``--save-maps``), and pruned at assembly to the cases the report shows.

One entry per (method, image, finding), keyed `gallery_map_key`:

- ``KEY``: the display map at model resolution as uint8 (0-255 over the display range): for a
  CAM or baseline the positive part over its maximum (the map the boxes are scored on); for a
  magnitude method (Integrated Gradients) ``|attribution|`` clipped at its
  `MAGNITUDE_CLIP_PERCENTILE`-th percentile, so that a few extreme pixels do not leave the rest
  as faint speckle.
- ``KEY|peak``: float32 ``[x, y, n_tied]``: the centre of the scored map's maximum (the point the
  pointing game reads; the first in row-major order when several pixels tie) in the image's
  original frame, and how many pixels share that maximum (0 when the map has no positive pixel).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from audit.store.files import write_npz
from audit.store.rundir import GALLERY_MAPS, read_npz

#: Methods whose attribution is shown as a clipped magnitude (signed, pixel-level attributions).
MAGNITUDE_METHODS: tuple[str, ...] = ("integrated_gradients",)
#: The display range of a magnitude map ends at this percentile of ``|attribution|``.
MAGNITUDE_CLIP_PERCENTILE = 99.0
PEAK_SUFFIX = "|peak"


def gallery_map_key(method: str, image_key: str, finding: str) -> str:
    """Key of one display map in ``gallery_maps.npz``."""
    return f"{method}|{image_key}|{finding}"


def display_map(method: str, saliency: np.ndarray) -> np.ndarray:
    """The map as the gallery shows it, as uint8 (see the module docstring)."""
    s = np.nan_to_num(np.asarray(saliency, dtype=np.float64))
    if method in MAGNITUDE_METHODS:
        a = np.abs(s)
        top = float(np.percentile(a, MAGNITUDE_CLIP_PERCENTILE)) if a.size else 0.0
        if top <= 0:
            top = float(a.max()) if a.size else 0.0
    else:
        a = np.clip(s, 0, None)
        top = float(a.max()) if a.size else 0.0
    if top <= 0:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.round(np.clip(a / top, 0, 1) * 255).astype(np.uint8)


def map_peak(positive: np.ndarray) -> tuple[float, float, int]:
    """``(x, y, n_tied)``: the centre of the first maximum pixel of a non-negative map, in map
    pixels (pixel (0, 0) has centre (0.5, 0.5)); ``(nan, nan, 0)`` when nothing is positive."""
    a = np.asarray(positive, dtype=np.float64)
    top = float(a.max()) if a.size else 0.0
    if not np.isfinite(top) or top <= 0:
        return (float("nan"), float("nan"), 0)
    tied = np.argwhere(a == top)
    row, col = tied[0]
    return (float(col) + 0.5, float(row) + 0.5, int(len(tied)))


def gallery_entry(method: str, image_key: str, finding: str, saliency: np.ndarray,
                  to_original: Callable[[np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    """The two arrays of one map; ``to_original`` maps ``[N, 4]`` boxes from the model's frame
    to the image's original frame (``Preprocessed.boxes_to_original``)."""
    key = gallery_map_key(method, image_key, finding)
    x, y, n = map_peak(np.clip(np.nan_to_num(np.asarray(saliency, dtype=np.float64)), 0, None))
    if n:
        x, y = (float(v) for v in to_original(np.array([[x, y, 0.0, 0.0]]))[0, :2])
    return {key: display_map(method, saliency),
            key + PEAK_SUFFIX: np.array([x, y, n], dtype=np.float32)}


def keep_gallery_maps(batch_dirs: Iterable[Path], wanted: set[tuple[str, str, str]],
                      out: Path) -> int:
    """Copy the entries of the ``(method, image_key, finding)`` cases in ``wanted`` from every
    batch's store into ``out``; returns how many maps were kept."""
    keys = {gallery_map_key(*case) for case in wanted}
    kept: dict[str, np.ndarray] = {}
    for batch in batch_dirs:
        for key, value in read_npz(Path(batch) / GALLERY_MAPS).items():
            if key.removesuffix(PEAK_SUFFIX) in keys:
                kept[key] = value
    write_npz(out, kept)
    return sum(not k.endswith(PEAK_SUFFIX) for k in kept)


class GalleryMaps:
    """A run's ``gallery_maps.npz``, read once: `get` gives ``(uint8 map, peak)`` or None."""

    def __init__(self, path: Path | None):
        self.arrays = read_npz(path) if path is not None else {}

    def get(self, method: str, image_key: str, findings: list[str]
            ) -> tuple[np.ndarray, np.ndarray] | None:
        for finding in findings:
            key = gallery_map_key(method, image_key, finding)
            if key in self.arrays:
                peak = self.arrays.get(key + PEAK_SUFFIX, np.array([np.nan, np.nan, 0]))
                return self.arrays[key], peak
        return None
