"""Fidelity: deletion and insertion curves (Petsiuk et al. 2018, RISE "causal metrics").

Pixels are ordered by saliency, most salient first (``order="saliency"``), or by a seeded random
permutation (``order="random"``, the comparison curve). With ``HW`` pixels and
``n = ceil(1 / step_fraction)`` steps, step ``i`` (0..n) acts on the first
``k_i = min(HW, round_half_up(i * step_fraction * HW))`` pixels of the order:

* deletion: the image with those pixels replaced by the baseline;
* insertion: the baseline with those pixels taken from the image.

So ``deletion[0] = f(image)``, ``deletion[n] = f(baseline)``, ``insertion[0] = f(baseline)``,
``insertion[n] = f(image)``. The curve's x is ``k_i / HW`` (the fraction actually changed; 51
points from 0 to 1 for the default 2% step) and the AUC is the trapezoid rule over x in [0, 1].
A pixel is all of its channels. Ties in saliency keep raster order (stable sort of the negated
map); non-finite saliency (NaN, -inf) is ordered last, +inf first.

Baselines: ``"blur"`` (Gaussian blur of the image, ``blur_sigma`` px, kernel radius
``ceil(3 sigma)``, reflect padding), ``"zero"``, ``"mean"`` (per-channel mean of the image), or
a tensor broadcastable to the image. Every masked variant (deletion and insertion together) is
evaluated as one batch (split into ``batch_size`` chunks when given) under
``torch.inference_mode()``; `deletion_insertion_curves_many` packs the variants of many images,
maps and orders into the same chunks (the audit's costly pairs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

__all__ = [
    "FidelityCurves",
    "make_baseline",
    "pixel_order",
    "step_counts",
    "curve_auc",
    "deletion_insertion_curves",
    "deletion_insertion_curves_many",
    "CurveSpec",
    "fidelity_scores",
    "fidelity_table",
]

PredictFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class FidelityCurves:
    """Deletion and insertion curves of one image and one saliency map."""

    x: np.ndarray  # [n + 1], fraction of pixels changed, 0 .. 1
    deletion: np.ndarray  # [n + 1]
    insertion: np.ndarray  # [n + 1]
    deletion_auc: float
    insertion_auc: float
    order: str
    baseline: str

    def figures(self) -> dict[str, float]:
        """``fidelity_deletion_auc``, ``fidelity_insertion_auc`` (suffix ``_random`` for a
        random-order curve): the ``images`` table columns."""
        suffix = "_random" if self.order == "random" else ""
        return {
            f"fidelity_deletion_auc{suffix}": self.deletion_auc,
            f"fidelity_insertion_auc{suffix}": self.insertion_auc,
        }

    def long_rows(self) -> list[dict]:
        """Rows for the ``curves`` table: ``family`` ("deletion" | "insertion", suffix
        ``_random`` for a random order), ``step``, ``x``, ``value``."""
        suffix = "_random" if self.order == "random" else ""
        rows = []
        for fam, values in (("deletion", self.deletion), ("insertion", self.insertion)):
            for i, (x, v) in enumerate(zip(self.x, values, strict=True)):
                rows.append({"family": fam + suffix, "step": i, "x": float(x), "value": float(v)})
        return rows

    def as_frame(self) -> pd.DataFrame:
        """Long table: ``family`` ("deletion" | "insertion"), ``step``, ``x``, ``value``."""
        n = len(self.x)
        return pd.DataFrame(
            {
                "family": ["deletion"] * n + ["insertion"] * n,
                "step": list(range(n)) * 2,
                "x": np.concatenate([self.x, self.x]),
                "value": np.concatenate([self.deletion, self.insertion]),
            }
        )


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return image.clone()
    radius = int(math.ceil(3.0 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(device=image.device, dtype=image.dtype)
    c, h, w = image.shape
    x = image.unsqueeze(0)
    mode = "reflect" if radius < min(h, w) else "replicate"
    x = F.pad(x, (radius, radius, 0, 0), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, radius, radius), mode=mode)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x.squeeze(0)


def make_baseline(image: torch.Tensor, baseline="blur", blur_sigma: float = 5.0) -> torch.Tensor:
    """The baseline image ``[C, H, W]`` for ``"blur" | "zero" | "mean"`` or a given tensor."""
    if image.ndim != 3:
        raise ValueError(f"image must be [C, H, W], got {tuple(image.shape)}")
    if isinstance(baseline, torch.Tensor):
        return torch.broadcast_to(baseline.to(image.device, image.dtype), image.shape).clone()
    if baseline == "blur":
        return _gaussian_blur(image, blur_sigma)
    if baseline == "zero":
        return torch.zeros_like(image)
    if baseline == "mean":
        return image.mean(dim=(1, 2), keepdim=True).expand_as(image).clone()
    raise ValueError(f"unknown baseline {baseline!r}")


def pixel_order(saliency, order: str = "saliency", seed: int = 0) -> np.ndarray:
    """Flat pixel indices, most salient first (stable: ties in raster order), or a seeded
    random permutation (``np.random.default_rng(seed).permutation``)."""
    s = np.asarray(saliency, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"saliency must be [H, W], got {s.shape}")
    flat = s.ravel()
    if order == "random":
        return np.random.default_rng(seed).permutation(flat.size)
    if order != "saliency":
        raise ValueError(f"unknown order {order!r}")
    key = np.where(np.isnan(flat), -np.inf, flat)
    # Stable sort of -key; -inf (NaN, -inf) sort last; among them raster order.
    return np.argsort(-key, kind="stable")


def step_counts(n_pixels: int, step_fraction: float = 0.02) -> np.ndarray:
    """Pixel counts ``k_0 = 0 < ... < k_n = n_pixels`` (n = ceil(1/step_fraction))."""
    if not 0 < step_fraction <= 1:
        raise ValueError("step_fraction must lie in (0, 1]")
    n = int(math.ceil(1.0 / step_fraction - 1e-9))
    frac = np.minimum(np.arange(n + 1) * step_fraction, 1.0)
    frac[-1] = 1.0
    return np.minimum(np.floor(frac * n_pixels + 0.5).astype(np.int64), n_pixels)


def curve_auc(x, y) -> float:
    """Trapezoid rule of ``y`` over ``x``."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def deletion_insertion_curves(
    predict_fn: PredictFn,
    image: torch.Tensor,
    saliency,
    step_fraction: float = 0.02,
    baseline="blur",
    blur_sigma: float = 5.0,
    order: Literal["saliency", "random"] = "saliency",
    seed: int = 0,
    batch_size: int | None = None,
) -> FidelityCurves:
    """Deletion and insertion curves of ``predict_fn`` (``[N, C, H, W] -> [N]``, e.g. the
    target's probability) for one ``image [C, H, W]`` and ``saliency [H, W]``."""
    spec = CurveSpec(image, saliency, order=order, seed=seed)
    return deletion_insertion_curves_many(
        lambda batch, _which: predict_fn(batch), [spec], step_fraction=step_fraction,
        baseline=baseline, blur_sigma=blur_sigma, batch_size=batch_size)[0]


@dataclass
class CurveSpec:
    """One curve pair of `deletion_insertion_curves_many`: an image ``[C, H, W]``, its saliency
    ``[H, W]``, the pixel order and its seed."""

    image: torch.Tensor
    saliency: object
    order: Literal["saliency", "random"] = "saliency"
    seed: int = 0


def _ranks(spec: CurveSpec) -> np.ndarray:
    """``[H, W]``: each pixel's position in the spec's order."""
    saliency = spec.saliency
    if isinstance(saliency, torch.Tensor):
        saliency = saliency.detach().float().cpu().numpy()
    c, h, w = spec.image.shape
    if np.asarray(saliency).shape != (h, w):
        raise ValueError(f"saliency {np.asarray(saliency).shape} does not match image {(h, w)}")
    perm = pixel_order(saliency, spec.order, spec.seed)
    rank = np.empty(h * w, dtype=np.int64)
    rank[perm] = np.arange(h * w)
    return rank.reshape(h, w)


def deletion_insertion_curves_many(
    predict_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    specs: list[CurveSpec],
    step_fraction: float = 0.02,
    baseline="blur",
    blur_sigma: float = 5.0,
    batch_size: int | None = None,
) -> list[FidelityCurves]:
    """`deletion_insertion_curves` of several (image, saliency, order) specs, every masked
    variant of every spec packed into the same chunks of ``batch_size`` (one chunk when None).
    ``predict_fn(batch [N, C, H, W], which [N]) -> [N]``: ``which`` holds the spec index of
    each variant (so each can be scored for its own target). All images share one shape."""
    if not specs:
        return []
    images = torch.stack([s.image for s in specs])
    n_specs, _c, h, w = images.shape
    bases = torch.stack([make_baseline(s.image, baseline, blur_sigma) for s in specs])
    hw = h * w
    ks = step_counts(hw, step_fraction)
    device = images.device
    rank_t = torch.as_tensor(np.stack([_ranks(s) for s in specs]), device=device)
    ks_t = torch.as_tensor(ks, device=device)
    n_pts = len(ks)
    per_spec = 2 * n_pts

    def variants(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Variant v of spec s is row s * 2n + v: v < n deletion, else insertion.
        idx = torch.arange(lo, hi, device=device)
        which, v = idx // per_spec, idx % per_spec
        k = ks_t[v % n_pts]
        changed = (rank_t[which] < k.view(-1, 1, 1)).unsqueeze(1)  # [m, 1, H, W]
        is_del = (v < n_pts).view(-1, 1, 1, 1)
        take_base = torch.where(is_del, changed, ~changed)
        return torch.where(take_base, bases[which], images[which]), which

    total = n_specs * per_spec
    chunk = total if not batch_size else int(batch_size)
    outs = []
    with torch.inference_mode():
        for lo in range(0, total, chunk):
            out = predict_fn(*variants(lo, min(total, lo + chunk)))
            outs.append(out.detach().reshape(-1).double().cpu())
    values = torch.cat(outs).numpy()
    if values.shape[0] != total:
        raise ValueError(f"predict_fn returned {values.shape[0]} values for {total} inputs")
    x = ks / hw
    name = baseline if isinstance(baseline, str) else "tensor"
    curves = []
    for i, spec in enumerate(specs):
        row = values[i * per_spec:(i + 1) * per_spec]
        dele, ins = row[:n_pts], row[n_pts:]
        curves.append(FidelityCurves(x, dele, ins, curve_auc(x, dele), curve_auc(x, ins),
                                     spec.order, name))
    return curves


def fidelity_scores(
    predict_fn: PredictFn,
    image: torch.Tensor,
    saliency,
    n_random: int = 1,
    seed: int = 0,
    **kwargs,
) -> dict:
    """AUCs of the saliency-ordered curves and the mean AUCs of ``n_random`` random orders
    (seeds ``seed, seed + 1, ...``): ``fidelity_deletion_auc, fidelity_insertion_auc,
    fidelity_deletion_auc_random, fidelity_insertion_auc_random`` (``images`` columns)."""
    s = deletion_insertion_curves(predict_fn, image, saliency, order="saliency", **kwargs)
    rd, ri = [], []
    for r in range(n_random):
        c = deletion_insertion_curves(
            predict_fn, image, saliency, order="random", seed=seed + r, **kwargs
        )
        rd.append(c.deletion_auc)
        ri.append(c.insertion_auc)
    return {
        **s.figures(),
        "fidelity_deletion_auc_random": float(np.mean(rd)) if rd else float("nan"),
        "fidelity_insertion_auc_random": float(np.mean(ri)) if ri else float("nan"),
    }


def fidelity_table(
    predict_fn: Callable[[torch.Tensor, int], torch.Tensor],
    images: torch.Tensor,
    saliencies,
    targets,
    n_random: int = 1,
    seed: int = 0,
    **kwargs,
) -> pd.DataFrame:
    """Batched ``fidelity_scores``: ``images [B, C, H, W]``, ``saliencies [B, K, H, W]``,
    ``targets [B, K]`` model output indices; ``predict_fn(batch, target) -> [N]``.
    One row per image x target: ``image_index, target_index, target`` + the AUC columns."""
    sal = (
        saliencies.detach().cpu().numpy()
        if isinstance(saliencies, torch.Tensor)
        else np.asarray(saliencies)
    )
    tg = (
        targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    )
    tg = tg.reshape(sal.shape[0], sal.shape[1])
    rows = []
    for b in range(sal.shape[0]):
        for k in range(sal.shape[1]):
            t = int(tg[b, k])

            def fn(batch, _t=t):
                return predict_fn(batch, _t)

            r = fidelity_scores(fn, images[b], sal[b, k], n_random=n_random, seed=seed, **kwargs)
            rows.append({"image_index": b, "target_index": k, "target": t, **r})
    return pd.DataFrame(rows)
