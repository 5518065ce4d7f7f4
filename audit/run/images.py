"""The images of a batch: decoded, preprocessed to the model's input, and thumbnailed for the
report; a file that cannot be decoded becomes a rejects row, never an error.

`image_prefetcher` gives the loader of a run: worker processes that decode the next batch while
a GPU computes (`ProcessPrefetcher`), or threads that decode it on the CPU's cores once the model
is done with the current batch (`ThreadPrefetcher`).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image

from audit.data.preprocess import PreprocessedImage, nominal_range, preprocess
from audit.data.readers import (
    SNIFF_BYTES,
    RejectedInput,
    decode_bytes,
    read_file_bytes,
    sniff_format,
)

THUMB_SIZE = 256  # px, longest side of a stored thumbnail
#: Decode workers by default beside a GPU: ``cores - 2`` (two cores stay with torch), at least 1
#: and at most ``MAX_AUTO_WORKERS``; none on one core. None on a CPU: there a worker only takes
#: cores from torch's threads. Measured on 2 cores, Grad-CAM + Grad-CAM++ localization of the 438
#: NIH dev images (`cxr-audit run`, channels_last, alternated): one worker decoding beside the
#: forward 67.0 / 74.9 / 77.5 s; threads decoding once the model is done 68.3 / 78.9 / 74.5 s.
#: Equal within the noise; the threads start no process (no second torch in memory) and the
#: first batch begins ~0.8 s sooner.
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


class _DecodeInTheCaller(NamedTuple):
    """An image left for the thread that takes the batch: a DICOM file (see `_load_image`)."""

    key: str
    rel: str


def _load_image(key: str, rel: str, images_root: Path, size: int, dicom: bool = True
                ) -> LoadedImage | dict[str, str] | _DecodeInTheCaller:
    """One image decoded, preprocessed and thumbnailed, or its rejects row. ``dicom=False`` (a
    decode thread): a DICOM file is left for the calling thread, because its decoder silences
    pydicom's warnings (they can quote header values) with a process-wide warnings filter, which
    is not thread-safe: another thread's ``catch_warnings`` could lose or keep it."""
    try:  # a missing file too is a RejectedInput ("cannot read file (FileNotFoundError)")
        data = read_file_bytes(Path(images_root) / rel)
        if not dicom and sniff_format(data[:SNIFF_BYTES]) == "dicom":
            return _DecodeInTheCaller(key, rel)
        decoded = decode_bytes(data)
    except RejectedInput as err:
        return reject_row(rel, key, str(err))
    pre = preprocess(decoded.pixels, size=size,
                     value_range=nominal_range(decoded.pixels, decoded.meta))
    return LoadedImage(key=str(key), pre=pre, thumb_png=thumbnail_png(decoded.pixels))


def _image_jobs(rows: pd.DataFrame) -> list[tuple[str, str]]:
    """``(image key, path)`` of each image of a batch, sorted by key."""
    return [(str(key), str(group["path"].iloc[0]))
            for key, group in rows.groupby("image_key", sort=True)]


def _as_batch(outcomes: list[LoadedImage | dict[str, str]]) -> LoadedBatch:
    return ([o for o in outcomes if isinstance(o, LoadedImage)],
            [o for o in outcomes if not isinstance(o, LoadedImage)])


def load_batch_images(rows: pd.DataFrame, images_root: Path, size: int) -> LoadedBatch:
    """Decode and preprocess each image of a batch (sorted by key); failures become rejects."""
    return _as_batch([_load_image(key, rel, images_root, size) for key, rel in _image_jobs(rows)])


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


def auto_workers(configured: int | None, device_type: str, cores: int | None = None,
                 n_batches: int | None = None) -> int:
    """Decode worker processes: ``configured`` when given; none when the model runs on the CPU
    (the workers would only take cores from torch: `ThreadPrefetcher` decodes there instead);
    else ``cores - 2`` between 1 and ``MAX_AUTO_WORKERS`` (none on a single core, none for a run
    of fewer than ``PREFETCH_MIN_BATCHES`` batches)."""
    if configured is not None:
        return max(0, int(configured))
    if device_type == "cpu":
        return 0
    if n_batches is not None and n_batches < PREFETCH_MIN_BATCHES:
        return 0
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return 0 if cores < 2 else max(1, min(MAX_AUTO_WORKERS, cores - 2))


#: At most this many decode threads: each one's antialiased resize runs torch's own thread team
#: (``torch.get_num_threads()`` threads), so threads x team grows with the square of the cores.
MAX_DECODE_THREADS = 4


def decode_threads() -> int:
    """Threads that decode a batch in this process: as many as torch computes with (the cores
    this process is meant to use), at most ``MAX_DECODE_THREADS``."""
    return max(1, min(MAX_DECODE_THREADS, torch.get_num_threads()))


def _worker_init() -> None:
    torch.set_num_threads(1)  # one core per worker; the parent's torch keeps its own threads


def _load_portable(rows: pd.DataFrame, images_root: Path, size: int) -> LoadedBatch:
    """`load_batch_images` with numpy arrays in place of tensors (pickled by value)."""
    loaded, rejects = load_batch_images(rows, images_root, size)
    for item in loaded:
        item.pre = dataclasses.replace(item.pre, tensor=item.pre.tensor.numpy())
    return loaded, rejects


class ImagePrefetcher:
    """Gives each batch its decoded images: ``submit(key, rows)`` starts decoding a batch ahead
    of use, ``take(key, rows)`` returns it (decoding it then when it was never submitted).

    This base decodes nothing ahead, one image after another when taken.
    ``beside_the_device``: whether a submitted batch decodes while the model computes (worker
    processes beside a GPU); when False, submit once the device is done with the current batch
    (`submit_next`)."""

    beside_the_device = False

    def __init__(self, images_root: Path, size: int):
        self.images_root, self.size = Path(images_root), int(size)

    def submit(self, key: str, rows: pd.DataFrame) -> None:
        """Start decoding the batch ``key`` (nothing here)."""

    def take(self, key: str, rows: pd.DataFrame) -> LoadedBatch:
        return load_batch_images(rows, self.images_root, self.size)

    def close(self) -> None:
        """Stop decoding (nothing here)."""


class ThreadPrefetcher(ImagePrefetcher):
    """Decodes the images of a batch side by side in ``threads`` threads of this process. On a CPU
    they use the cores torch computes with, so a batch is submitted once the model is done with
    the previous one: it decodes while that batch is scored and written (single-threaded Python),
    and the rest when it is taken. DICOM files are decoded when the batch is taken, in the
    taking thread (`_load_image`). Measured on 2 cores against one worker process decoding beside
    the forward: see `auto_workers`."""

    def __init__(self, images_root: Path, size: int, threads: int):
        super().__init__(images_root, size)
        self._pool = ThreadPoolExecutor(max(1, int(threads)), thread_name_prefix="decode")
        self._pending: dict[str, list[Future[LoadedImage | dict[str, str]]]] = {}

    def submit(self, key: str, rows: pd.DataFrame) -> None:
        if key not in self._pending:
            self._pending[key] = [self._pool.submit(_load_image, k, rel, self.images_root,
                                                    self.size, dicom=False)
                                  for k, rel in _image_jobs(rows)]

    def take(self, key: str, rows: pd.DataFrame) -> LoadedBatch:
        self.submit(key, rows)
        outcomes = [f.result() for f in self._pending.pop(key)]
        return _as_batch([_load_image(o.key, o.rel, self.images_root, self.size)
                          if isinstance(o, _DecodeInTheCaller) else o for o in outcomes])

    def close(self) -> None:
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)  # cancels what has not started


class ProcessPrefetcher(ImagePrefetcher):
    """Decodes batches in ``workers`` processes (forkserver start, never a fork of a threaded
    parent) while the model computes: for a GPU, whose work leaves the CPU's cores free."""

    beside_the_device = True

    def __init__(self, images_root: Path, size: int, workers: int):
        super().__init__(images_root, size)
        self.workers = max(1, int(workers))
        self._pool: ProcessPoolExecutor | None = None
        self._pending: dict[str, Future[LoadedBatch]] = {}

    def submit(self, key: str, rows: pd.DataFrame) -> None:
        if key in self._pending:
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
            return super().take(key, rows)
        loaded, rejects = future.result()
        for item in loaded:
            item.pre = dataclasses.replace(item.pre, tensor=torch.from_numpy(item.pre.tensor))
        return loaded, rejects

    def close(self) -> None:
        self._pending.clear()
        if self._pool is not None:  # shutdown cancels what has not started
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def image_prefetcher(images_root: Path, size: int, workers: int) -> ImagePrefetcher:
    """``workers`` processes when positive (`auto_workers`), else `decode_threads` threads (or
    the plain base on a single thread)."""
    if workers > 0:
        return ProcessPrefetcher(images_root, size, workers)
    threads = decode_threads()
    return ThreadPrefetcher(images_root, size, threads) if threads > 1 else \
        ImagePrefetcher(images_root, size)


def submit_next(loader: ImagePrefetcher, key: str, rows: pd.DataFrame
                ) -> Callable[[], None] | None:
    """Start decoding the next batch now when ``loader`` decodes beside the device; else return
    the call that starts it, for `audit_batch`'s ``device_done``."""
    if loader.beside_the_device:
        loader.submit(key, rows)
        return None
    return functools.partial(loader.submit, key, rows)
