"""The images of a batch: decoded, preprocessed to the model's input, and thumbnailed for the
report; a file that cannot be decoded becomes a rejects row, never an error."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from audit.data.preprocess import PreprocessedImage, nominal_range, preprocess
from audit.data.readers import RejectedInput, read_image

THUMB_SIZE = 256  # px, longest side of a stored thumbnail


@dataclass
class LoadedImage:
    """One decoded, preprocessed image of a batch."""

    key: str
    pre: PreprocessedImage
    thumb_png: bytes

    @property
    def tensor(self) -> torch.Tensor:
        return self.pre.tensor

    @property
    def width(self) -> int:
        return self.pre.original_size[0]

    @property
    def height(self) -> int:
        return self.pre.original_size[1]


def reject_row(path: str, image_key: str, reason: str, finding: str = "") -> dict[str, str]:
    """A rejects-table row (`audit.store.rundir.REJECT_COLUMNS`)."""
    return {"path": str(path), "image_key": str(image_key), "finding": finding, "reason": reason}


def load_batch_images(rows: pd.DataFrame, images_root: Path, size: int
                      ) -> tuple[list[LoadedImage], list[dict[str, str]]]:
    """Decode and preprocess each image of a batch (sorted by key); failures become rejects."""
    loaded: list[LoadedImage] = []
    rejects: list[dict[str, str]] = []
    for key, group in rows.groupby("image_key", sort=True):
        rel = group["path"].iloc[0]
        try:
            decoded = read_image(Path(images_root) / rel)
        except RejectedInput as err:
            rejects.append(reject_row(rel, key, str(err)))
            continue
        except FileNotFoundError:
            rejects.append(reject_row(rel, key, "file named in the manifest is missing on disk"))
            continue
        pre = preprocess(decoded.pixels, size=size,
                         value_range=nominal_range(decoded.pixels, decoded.meta))
        loaded.append(LoadedImage(key=str(key), pre=pre, thumb_png=thumbnail_png(decoded.pixels)))
    return loaded, rejects


def thumbnail_png(pixels: np.ndarray) -> bytes:
    """The image min-max scaled to 8 bits, longest side ``THUMB_SIZE``, as PNG bytes."""
    lo, hi = float(np.min(pixels)), float(np.max(pixels))
    scaled = (pixels - lo) / (hi - lo) if hi > lo else np.zeros_like(pixels)
    img = Image.fromarray((scaled * 255).round().astype(np.uint8))
    img.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
