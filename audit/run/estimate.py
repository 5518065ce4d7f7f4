"""What a run will do and about how long it will take on this machine, told before the work
starts: the plan (images, boxes, methods, IG steps, costly pairs) and an estimate from a short
calibration (a few timed forwards and forward+backward passes of the run's model).

The estimate counts the passes the run makes, in units measured here:
* every image: one decode (+ preprocess + thumbnail) and one forward (the predictions and the
  Grad-CAM/Grad-CAM++ closed form come from it);
* every IG pair: ``steps`` forward+backward path points (+ 2 forwards for rules without end
  nodes, e.g. Gauss-Legendre);
* every costly pair, for each method ``m`` with ``E(m)`` the cost of one explanation (a forward
  for a CAM method, IG's path for IG): repeatability ``5 E(m)``; randomization ``blocks x E``
  (the CAM methods share their forward); fidelity ``2 orders x 2 / step_fraction`` forwards.
Prefect's start, ingest and the report are not counted (tens of seconds).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from audit.config import AuditSettings
from audit.metrics.randomization import DENSENET_CASCADE
from audit.run.images import load_batch_images
from audit.run.plan import IG_METHOD, Selection
from audit.saliency.integrated_gradients import quadrature

CAM_METHODS = ("gradcam", "gradcampp")
REPEATABILITY_EXPLANATIONS = 5  # reference, determinism, noisy, two shifts
CALIBRATION_POINTS = 2  # images per timed pass
TIMED_PASSES = 3
CALIBRATION_LOADS = 2  # images per timed load


@dataclass
class Calibration:
    """Seconds per image of one forward, one forward+backward (an IG path point) and one image
    load (decode, preprocess, thumbnail), measured on this machine."""

    forward: float
    forward_backward: float
    load: float


@dataclass
class RunPlan:
    """The counts of a run: images, boxes, (image, finding) targets, IG pairs, costly pairs."""

    images: int
    boxes: int
    targets: int
    ig_pairs: int
    costly_pairs: int
    methods: list[str]
    ig_points: int  # path points per IG pair (steps, + ends)

    def seconds(self, cal: Calibration, settings: AuditSettings) -> dict[str, float]:
        """Estimated seconds per part: ``load``, ``explain`` and ``costly``."""
        has_cam = any(m in CAM_METHODS for m in self.methods)
        ig = self.ig_points * cal.forward_backward if IG_METHOD in self.methods else 0.0
        cam = cal.forward if has_cam else 0.0
        main = self.images * cal.forward + self.ig_pairs * ig
        blocks = len(settings.randomization_blocks or DENSENET_CASCADE)
        per_pair = 0.0
        if "repeatability" in settings.metrics:
            n_cam = sum(m in CAM_METHODS for m in self.methods)
            per_pair += REPEATABILITY_EXPLANATIONS * (n_cam * cal.forward + ig)
        if "randomization" in settings.metrics:
            per_pair += blocks * (cam + ig)
        if "fidelity" in settings.metrics:
            variants = 2 * (math.ceil(1.0 / settings.fidelity_step - 1e-9) + 1)
            per_pair += len(self.methods) * 2 * variants * cal.forward
        return {"load": self.images * cal.load, "explain": main,
                "costly": self.costly_pairs * per_pair}


def image_targets_count(manifest: pd.DataFrame) -> int:
    """(image, finding) targets: an image's boxed findings, its labels when it has no box."""
    boxed = manifest.dropna(subset=["box_x"])
    count = len(boxed[["image_key", "model_finding"]].drop_duplicates())
    unboxed = manifest[~manifest["image_key"].isin(boxed["image_key"])]
    if "labels" in unboxed:
        for labels in unboxed.drop_duplicates("image_key")["labels"].dropna():
            count += len({n for n in str(labels).split("|") if n and n != "No Finding"})
    return count


def run_plan(selection: Selection, settings: AuditSettings) -> RunPlan:
    manifest = selection.manifest
    targets = image_targets_count(manifest)
    alphas, _ = quadrature(settings.ig_method, settings.ig_steps)
    ends = 0 if (0.0 in alphas and 1.0 in alphas) else 2
    return RunPlan(images=int(manifest["image_key"].nunique()),
                   boxes=int(manifest["box_x"].notna().sum()), targets=targets,
                   ig_pairs=targets if selection.ig is None else len(selection.ig),
                   costly_pairs=len(selection.costly), methods=list(settings.methods),
                   ig_points=len(alphas) + ends)


def _fastest(call: Any) -> float:
    """Seconds of the fastest of ``TIMED_PASSES`` calls of ``call`` (the fastest, so a moment of
    load from other processes does not multiply the estimate)."""
    best = math.inf
    for _ in range(TIMED_PASSES):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def _timed(fn: Any, x: torch.Tensor) -> float:
    """Seconds per input of ``fn``: `_fastest` of its passes over ``x``, after a warm-up on its
    first input."""
    fn(x[:1])
    return _fastest(lambda: fn(x)) / len(x)


def _load_seconds(rows: pd.DataFrame, images_root: Path, size: int) -> float:
    """Seconds per image of loading the images of ``rows``, as `_timed` times a forward: the
    `_fastest` of its passes after a warm-up pass. The first decode in a process pays
    one-time set-up: counted once per image, it made the load of the 438 NIH dev images 2 min
    (306 ms per image) in an estimate, against about 10 s in the run."""
    def load() -> None:
        load_batch_images(rows, images_root, size)

    load()
    return _fastest(load) / max(1, int(rows["image_key"].nunique()))


def calibrate(model: Any, settings: AuditSettings, manifest: pd.DataFrame,
              images_root: Path) -> Calibration:
    """Time forwards and (with IG among the methods) forward+backward passes of
    ``CALIBRATION_POINTS`` inputs (`_timed`), and the load of up to ``CALIBRATION_LOADS`` of the
    run's images (`_load_seconds`); about a second on two CPU cores."""
    size = settings.image_size
    g = torch.Generator().manual_seed(0)
    x = torch.rand((CALIBRATION_POINTS, 1, size, size), generator=g) * 2048 - 1024
    x = x.to(model.device)

    def forward(batch: torch.Tensor) -> None:
        with torch.inference_mode():
            model.logits(batch)
        _sync(batch)

    def forward_backward(batch: torch.Tensor) -> None:
        pts = batch.clone().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.grad(model.logits(pts)[:, 0].sum(), pts)
        _sync(batch)

    keys = sorted(manifest["image_key"].unique())[:CALIBRATION_LOADS]
    load = _load_seconds(manifest[manifest["image_key"].isin(keys)], images_root, size)
    needs_backward = IG_METHOD in settings.methods
    return Calibration(_timed(forward, x),
                       _timed(forward_backward, x) if needs_backward else 0.0, load)


def _sync(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def describe(plan: RunPlan, cal: Calibration, settings: AuditSettings, device: str) -> str:
    """The lines printed before the work starts."""
    parts = plan.seconds(cal, settings)
    total = sum(parts.values())
    ig = IG_METHOD in plan.methods
    lines = [
        f"plan: {plan.images} images, {plan.boxes} boxes, {plan.targets} (image, finding) "
        f"targets; methods {', '.join(plan.methods) or 'none'}"
        + (f"; IG {settings.ig_steps} steps on {plan.ig_pairs} pairs" if ig else "")
        + f"; {plan.costly_pairs} costly pairs ({', '.join(settings.metrics)})",
        f"calibration on {device}: forward {cal.forward * 1e3:.1f} ms/image, "
        + (f"forward+backward {cal.forward_backward * 1e3:.1f} ms/point, " if ig else "")
        + f"load {cal.load * 1e3:.0f} ms/image",
        f"estimate: about {_duration(total)} (load {_duration(parts['load'])}, explain+score "
        f"{_duration(parts['explain'])}, costly metrics {_duration(parts['costly'])}; "
        "plus Prefect's start and the report)",
    ]
    if ig and plan.ig_pairs and settings.ig_per_pathology is None:
        ig_share = plan.ig_pairs * plan.ig_points * cal.forward_backward
        if ig_share > 0.5 * total and total > 600:
            lines.append(f"hint: IG is about {_duration(ig_share)} of that; "
                         "--ig-per-pathology N runs IG on N pairs per finding (seeded) while "
                         "Grad-CAM/Grad-CAM++ score every box")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
