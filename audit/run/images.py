"""The images of a batch: decoded, preprocessed to the model's input, and thumbnailed for the
report; a file that cannot be decoded becomes a rejects row, never an error.

`ImagePrefetcher` decodes batches in worker processes ahead of use, so the next batch is ready
when the device finishes the current one (``workers=0``: each batch is decoded when asked).
"""

from __future__ import annotations

import dataclasses
import io
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from audit.data.preprocess import PreprocessedImage, nominal_range, preprocess
from audit.data.readers import RejectedInput, read_image

THUMB_SIZE = 256  # px, longest side of a stored thumbnail
#: Decode workers by default: ``cores - 2`` (two cores stay with torch), at least 1 and at most
#: ``MAX_AUTO_WORKERS``; none on one core. On 2 cores the worker shares the cores with torch; it
#: was measured not slower there (Grad-CAM + Grad-CAM++ localization of the 438 NIH dev images,
#: `cxr-audit run`, 2 loaded cores, 1 worker vs none: 137.8 vs 144.8 s and 138.2 vs 142.4 s;
#: benchmarks/pipeline_bench.py on 128 images: 89.9 vs 105.1 s).
MAX_AUTO_WORKERS = 4


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


#: What a batch's loading gives: its decoded images (sorted by key) and its rejects rows.
LoadedBatch = tuple[list["LoadedImage"], list[dict[str, str]]]


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


#: zlib level of the thumbnails. Measured on 16 NIH dev images (2 loaded cores): scaling in
#: place in float32 + level 3 takes 10 ms per image against 40 ms for the former float64 scaling
#: + ``optimize=True``; files of 33 kB instead of 29 kB; pixels equal within 1 gray level.
THUMB_COMPRESS_LEVEL = 3


def thumbnail_png(pixels: np.ndarray) -> bytes:
    """The image min-max scaled to 8 bits, longest side ``THUMB_SIZE``, as PNG bytes."""
    lo, hi = float(np.min(pixels)), float(np.max(pixels))
    scaled = np.empty(pixels.shape, dtype=np.float32)
    if hi > lo:  # in place, float32: the 8-bit values of (pixels - lo) / (hi - lo) * 255
        np.subtract(pixels, lo, out=scaled, casting="unsafe")
        np.multiply(scaled, 255.0 / (hi - lo), out=scaled)
        np.rint(scaled, out=scaled)
    else:
        scaled.fill(0.0)
    img = Image.fromarray(scaled.astype(np.uint8))
    img.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", compress_level=THUMB_COMPRESS_LEVEL)  # never optimize=True
    return buffer.getvalue()


#: No automatic decode workers for a run of fewer batches: starting them (a forkserver and a
#: worker importing torch) costs more than they save. Measured on 2 cores: a 4-batch run (8 NIH
#: dev images, Grad-CAM + Grad-CAM++) took 23.6 and 21.0 s with one worker, 19.2 and 17.8 s
#: without; the worker saves ~0.25 s a batch (the 28-batch figures at `MAX_AUTO_WORKERS`).
PREFETCH_MIN_BATCHES = 12


def auto_workers(configured: int | None = None, cores: int | None = None,
                 n_batches: int | None = None) -> int:
    """Decode worker processes: ``configured`` when given, else ``cores - 2`` between 1 and
    ``MAX_AUTO_WORKERS`` (none on a single core, none for a run of fewer than
    ``PREFETCH_MIN_BATCHES`` batches)."""
    if configured is not None:
        return max(0, int(configured))
    if n_batches is not None and n_batches < PREFETCH_MIN_BATCHES:
        return 0
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return 0 if cores < 2 else max(1, min(MAX_AUTO_WORKERS, cores - 2))


def _worker_init() -> None:
    torch.set_num_threads(1)  # one core per worker; the parent's torch keeps its own threads


def _load_portable(rows: pd.DataFrame, images_root: Path, size: int) -> LoadedBatch:
    """`load_batch_images` with numpy arrays in place of tensors (pickled by value)."""
    loaded, rejects = load_batch_images(rows, images_root, size)
    for item in loaded:
        item.pre = dataclasses.replace(item.pre, tensor=item.pre.tensor.numpy())
    return loaded, rejects


class ImagePrefetcher:
    """Decodes batches ahead of use in ``workers`` processes (forkserver start, never a fork of
    a threaded parent). ``submit(key, rows)`` starts one; ``take(key, rows)`` returns it (decoding
    it here when it was never submitted or ``workers`` is 0)."""

    def __init__(self, images_root: Path, size: int, workers: int):
        self.images_root, self.size, self.workers = Path(images_root), int(size), int(workers)
        self._pool: ProcessPoolExecutor | None = None
        self._pending: dict[str, Future[LoadedBatch]] = {}

    def submit(self, key: str, rows: pd.DataFrame) -> None:
        if self.workers <= 0 or key in self._pending:
            return
        if self._pool is None:
            context = multiprocessing.get_context("forkserver")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context,
                                             initializer=_worker_init)
        self._pending[key] = self._pool.submit(_load_portable, rows, self.images_root,
                                               self.size)

    def take(self, key: str, rows: pd.DataFrame) -> LoadedBatch:
        future = self._pending.pop(key, None)
        if future is None:
            return load_batch_images(rows, self.images_root, self.size)
        loaded, rejects = future.result()
        for item in loaded:
            item.pre = dataclasses.replace(item.pre, tensor=torch.from_numpy(item.pre.tensor))
        return loaded, rejects

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
