"""Model-free baselines with the saliency interface: what a method must beat.

* ``random``: a uniform [0, 1) map per (image, target) at input resolution, from a
  ``torch.Generator`` seeded by ``(seed, start_index + b, target output index)`` (drawn on the
  CPU, so the same on every device and for any batching, given ``start_index`` = the index of
  the batch's first image in the run).
* ``centre_prior``: a centred isotropic-per-axis Gaussian, ``exp(-((u-W/2)^2/(2 sx^2) +
  (v-H/2)^2/(2 sy^2)))`` at pixel centres ``(c+0.5, r+0.5)``, ``sx = sigma_fraction * W``.
* ``average_box``: the indicator of the average expert box of the target's finding (mean of
  x, y, w, h over the boxes of that finding), scaled from the table's frame to the input size;
  a pixel is inside when its centre lies in the closed box (``docs/interfaces.md``). The default
  table, ``average_boxes_nih.json``, is computed from the *development* half of the NIH boxes
  only (``scripts/make_average_boxes.py``); pass ``table=`` (a path or a dict) for another one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from audit.protocol import to_model_finding
from audit.saliency.base import SaliencyMethod, SaliencyResult

__all__ = [
    "RandomMap",
    "CentrePrior",
    "AverageBox",
    "DEFAULT_AVERAGE_BOX_TABLE",
    "load_average_box_table",
    "box_indicator",
]

DEFAULT_AVERAGE_BOX_TABLE = Path(__file__).with_name("average_boxes_nih.json")

def _seed_for(*parts: int) -> int:
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _finding_name(model, index: int) -> str:
    names = model.pathologies
    if not 0 <= index < len(names):
        raise IndexError(f"target index {index} outside the model's {len(names)} outputs")
    return names[index]


class RandomMap(SaliencyMethod):
    """Options (prefix ``random_``): ``seed`` (0), ``start_index`` (0)."""

    name: ClassVar[str] = "random"
    kind: ClassVar[str] = "baseline"
    prefix: ClassVar[str] = "random_"
    options: ClassVar[dict[str, Any]] = {"seed": 0, "start_index": 0}

    def _explain(self, model, x: torch.Tensor, targets: torch.Tensor) -> SaliencyResult:
        b, k = targets.shape
        h, w = x.shape[-2:]
        maps = torch.empty((b, k, h, w), dtype=torch.float32)
        seed, start = int(self.config["seed"]), int(self.config["start_index"])
        t_cpu = targets.cpu()
        for i in range(b):
            for j in range(k):
                g = torch.Generator(device="cpu")
                g.manual_seed(_seed_for(seed, start + i, int(t_cpu[i, j])))
                maps[i, j] = torch.rand((h, w), generator=g, dtype=torch.float32)
        maps = maps.to(x.device)
        return SaliencyResult(maps, maps, {})


def centre_gaussian(height: int, width: int, sigma_fraction: float = 0.25,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """``[H, W]`` centred Gaussian with peak 1 (sigma = fraction of each side)."""
    v = (torch.arange(height, dtype=torch.float64) + 0.5 - height / 2.0) / (sigma_fraction * height)
    u = (torch.arange(width, dtype=torch.float64) + 0.5 - width / 2.0) / (sigma_fraction * width)
    g = torch.exp(-0.5 * (v[:, None] ** 2 + u[None, :] ** 2))
    return g.float().to(device)


class CentrePrior(SaliencyMethod):
    """Options (prefix ``centre_``): ``sigma_fraction`` (0.25 of the image side)."""

    name: ClassVar[str] = "centre_prior"
    kind: ClassVar[str] = "baseline"
    prefix: ClassVar[str] = "centre_"
    options: ClassVar[dict[str, Any]] = {"sigma_fraction": 0.25}

    def _explain(self, model, x: torch.Tensor, targets: torch.Tensor) -> SaliencyResult:
        b, k = targets.shape
        h, w = x.shape[-2:]
        g = centre_gaussian(h, w, float(self.config["sigma_fraction"]), x.device)
        maps = g.expand(b, k, h, w).clone()
        return SaliencyResult(maps, maps, {})


def load_average_box_table(table: str | Path | dict | None = None) -> dict[str, Any]:
    """The table as a dict ``{"frame": {"width", "height"}, "boxes": {finding: {x, y, w, h,
    ...}}}``; ``None`` -> the packaged NIH development-half table. A bare ``{finding: {x, y, w,
    h}}`` dict is taken to be in the 1024x1024 NIH frame."""
    if table is None:
        table = DEFAULT_AVERAGE_BOX_TABLE
    if isinstance(table, (str, Path)):
        with open(table, encoding="utf-8") as fh:
            table = json.load(fh)
    if not isinstance(table, dict):
        raise TypeError(f"average-box table must be a path or a dict, got {type(table).__name__}")
    if "boxes" not in table:
        table = {"frame": {"width": 1024, "height": 1024}, "boxes": table}
    frame = table.get("frame", {"width": 1024, "height": 1024})
    boxes = {}
    for name, box in table["boxes"].items():
        boxes[to_model_finding(name)] = {k: float(box[k]) for k in ("x", "y", "w", "h")}
    return {**table, "frame": {"width": float(frame["width"]), "height": float(frame["height"])},
            "boxes": boxes}


def box_indicator(box: tuple[float, float, float, float], height: int, width: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """``[H, W]`` float32: 1 where the pixel centre lies in the closed box ``(x, y, w, h)``
    (`audit.data.preprocess.box_mask`)."""
    from audit.data.preprocess import box_mask

    mask = box_mask(np.asarray(box, dtype=np.float64), (int(height), int(width)))
    return torch.from_numpy(mask).float().to(device)


class AverageBox(SaliencyMethod):
    """Options (prefix ``average_box_``): ``table`` (path, dict, or None = packaged NIH dev)."""

    name: ClassVar[str] = "average_box"
    kind: ClassVar[str] = "baseline"
    prefix: ClassVar[str] = "average_box_"
    options: ClassVar[dict[str, Any]] = {"table": None}

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.table = load_average_box_table(self.config["table"])

    def _explain(self, model, x: torch.Tensor, targets: torch.Tensor) -> SaliencyResult:
        b, k = targets.shape
        h, w = x.shape[-2:]
        fw, fh = self.table["frame"]["width"], self.table["frame"]["height"]
        maps = torch.empty((b, k, h, w), dtype=torch.float32, device=x.device)
        cache: dict[int, torch.Tensor] = {}
        t_cpu = targets.cpu()
        for i in range(b):
            for j in range(k):
                t = int(t_cpu[i, j])
                if t not in cache:
                    finding = _finding_name(model, t)
                    box = self.table["boxes"].get(finding)
                    if box is None:
                        raise ValueError(
                            f"average_box: no average box for finding {finding!r} (output {t}); "
                            f"the table has: {', '.join(sorted(self.table['boxes']))}")
                    scaled = (box["x"] * w / fw, box["y"] * h / fh,
                              box["w"] * w / fw, box["h"] * h / fh)
                    cache[t] = box_indicator(scaled, h, w, x.device)
                maps[i, j] = cache[t]
        return SaliencyResult(maps, maps, {})
