"""Integrated Gradients (Sundararajan et al. 2017) for B images x K target logits.

``IG_i(x) = (x_i - x'_i) · ∫_0^1 dF(x' + a (x - x'))/dx_i da``, the integral by a quadrature rule
with ``steps`` nodes (Captum's names: ``riemann_left``, ``riemann_right``, ``riemann_middle``,
``riemann_trapezoid``, ``gausslegendre``; same nodes and weights as Captum), plus ``trapezoid``.
Note: Captum's ``riemann_trapezoid`` puts its nodes at ``linspace(0, 1, n)`` but uses step
``1/n`` (halved at both ends), so its weights sum to ``1 - 1/n``: every attribution is scaled by
about ``(n-1)/n`` (2% at 50 steps), which shows up in the completeness gap. It is kept as is
for comparability; ``trapezoid`` is the composite trapezoid rule (step ``1/(n-1)``, weights sum
to 1). The map is the attribution summed over input channels (signed, not normalized).

Cost: one forward per path point, shared by the K targets of the image; the K input gradients
come from the same graph (``multi_target="loop"``: K backward passes with ``retain_graph``;
``"batched"``: one vectorized ``is_grads_batched`` backward; ``"auto"`` (default): batched on
CUDA, loop on CPU — measured with benchmarks/saliency_bench.py, 14 targets at 224 px: on CPU the
loop is ~1.8x faster (vmap's batched backward runs slower there), on an H200 the batched
backward is ~1.36x faster than the loop). Path points of all images of the
batch are flattened and processed in chunks of ``internal_batch_size`` points.

``explain_pairs`` takes ragged (image, target) pairs instead (the audit's batches: each image has
its own findings): the path points of every pair are packed into the same chunks, each point
with its own target, so one forward and one backward per chunk give every point's gradient
(exactly ``steps`` forward+backward per pair: the floor). ``internal_batch_size=None`` (the
default) sizes the chunks automatically: on CUDA from the free device memory and the bytes one
point keeps for its backward (measured once per model and input size), elsewhere
``CPU_CHUNK`` points.

Baselines (``baseline``): ``"black"`` = the darkest value of torchxrayvision's range, -1024 (an
all-black radiograph; *not* 0, which is mid-grey in that range); ``"zeros"`` = 0 (mid-grey);
``"mean"`` = the image's own mean, per image and channel; ``"blurred"`` = the image after a
Gaussian blur of ``blur_sigma`` pixels (separable, reflect padding, radius ceil(3 sigma)); a
float constant; or a tensor broadcastable to ``x``.

Extras per map: ``delta_f = F(x) - F(x')`` (target logit), ``attribution_sum``, and
``completeness_gap = |attribution_sum - delta_f|`` (Captum's convergence delta, absolute).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from audit.protocol import QUADRATURE_RULES
from audit.saliency.base import SaliencyMethod, SaliencyResult

__all__ = [
    "IntegratedGradients",
    "QUADRATURE_RULES",
    "CAPTUM_RULES",
    "quadrature",
    "make_baseline",
    "gaussian_blur",
    "BLACK",
    "CPU_CHUNK",
    "auto_chunk",
]

#: The darkest value of torchxrayvision's input range [-1024, 1024].
BLACK = -1024.0
#: Path points per chunk off CUDA (automatic sizing): larger chunks do not run faster on a CPU.
CPU_CHUNK = 25
#: Share of the free CUDA memory the automatic chunk may fill, and its upper bound in points.
CUDA_MEMORY_SHARE = 0.5
CUDA_MAX_CHUNK = 1024

#: The rules whose names and numbers are Captum's (`QUADRATURE_RULES` adds ``trapezoid``).
CAPTUM_RULES = QUADRATURE_RULES[:5]


def quadrature(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``alphas`` in [0, 1] and weights (step sizes) for ``steps`` points, float64; for
    Captum's rule names the same numbers as Captum's ``approximation_parameters``."""
    n = int(steps)
    if method == "gausslegendre":
        if n < 1:
            raise ValueError("gausslegendre needs steps >= 1")
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return 0.5 * (1.0 + nodes), 0.5 * weights
    if method not in QUADRATURE_RULES:
        raise ValueError(f"unknown quadrature {method!r}; known: {', '.join(QUADRATURE_RULES)}")
    if n < 2:
        raise ValueError("Riemann rules need steps >= 2")
    w = np.full(n, 1.0 / n)
    if method == "trapezoid":
        w = np.full(n, 1.0 / (n - 1))
        w[0] /= 2
        w[-1] /= 2
        a = np.linspace(0.0, 1.0, n)
    elif method == "riemann_trapezoid":  # Captum's: weights sum to 1 - 1/n
        w[0] /= 2
        w[-1] /= 2
        a = np.linspace(0.0, 1.0, n)
    elif method == "riemann_left":
        a = np.linspace(0.0, 1.0 - 1.0 / n, n)
    elif method == "riemann_middle":
        a = np.linspace(1.0 / (2 * n), 1.0 - 1.0 / (2 * n), n)
    else:  # riemann_right
        a = np.linspace(1.0 / n, 1.0, n)
    return a, w


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` (reflect padding, radius ceil(3 sigma),
    clamped below the image size)."""
    if sigma <= 0:
        return x.clone()
    h, w = x.shape[-2:]
    radius = max(1, min(int(math.ceil(3.0 * sigma)), h - 1, w - 1))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(dtype=x.dtype, device=x.device)
    c = x.shape[1]
    y = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def make_baseline(x: torch.Tensor, baseline: str | float | torch.Tensor = "black",
                  blur_sigma: float = 10.0) -> torch.Tensor:
    """The baseline image ``x'`` for each image of ``x`` (same shape)."""
    if isinstance(baseline, torch.Tensor):
        return baseline.to(device=x.device, dtype=x.dtype).expand_as(x).clone()
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    if baseline == "black":
        return torch.full_like(x, BLACK)
    if baseline == "zeros":
        return torch.zeros_like(x)
    if baseline == "mean":
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x).clone()
    if baseline == "blurred":
        return gaussian_blur(x, float(blur_sigma))
    raise ValueError(f"unknown baseline {baseline!r}: black | zeros | mean | blurred | float | "
                     "tensor")


_POINT_BYTES: dict[tuple[int, tuple[int, ...], str], int] = {}


def _bytes_per_point(model, x: torch.Tensor) -> int:
    """Bytes the autograd graph keeps for one path point (saved tensors, counted per save, so an
    overestimate), plus its input and gradient; measured once per network, shape and device."""
    key = (id(model.net), tuple(x.shape[1:]), str(x.device))
    if key not in _POINT_BYTES:
        saved = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        pt = x[:1].detach().clone().requires_grad_(True)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model.logits(pt)
        del out
        _POINT_BYTES[key] = saved[0] + 2 * pt.numel() * pt.element_size()
    return _POINT_BYTES[key]


def auto_chunk(model, x: torch.Tensor, n_points: int, configured: int | None) -> int:
    """Path points per forward: ``configured`` when given; otherwise on CUDA the share
    ``CUDA_MEMORY_SHARE`` of the free memory divided by `_bytes_per_point` (at most
    ``CUDA_MAX_CHUNK``), elsewhere ``CPU_CHUNK``; never more than ``n_points``."""
    if configured:
        return max(1, min(int(configured), n_points))
    if x.device.type != "cuda":
        return max(1, min(CPU_CHUNK, n_points))
    free, _total = torch.cuda.mem_get_info(x.device)
    fit = int(CUDA_MEMORY_SHARE * free // max(1, _bytes_per_point(model, x)))
    return max(1, min(fit, CUDA_MAX_CHUNK, n_points))


class IntegratedGradients(SaliencyMethod):
    """Options (prefix ``ig_``): ``steps`` (50), ``method`` (``"gausslegendre"``),
    ``baseline`` (``"black"``), ``blur_sigma`` (10 px, for ``"blurred"``),
    ``internal_batch_size`` (path points per forward; None = automatic, see `auto_chunk`),
    ``multi_target`` (``"auto"`` | ``"loop"`` | ``"batched"``; auto = batched on CUDA, loop
    elsewhere; the loop is also the lighter in memory)."""

    name: ClassVar[str] = "integrated_gradients"
    prefix: ClassVar[str] = "ig_"
    non_negative: ClassVar[bool] = False
    options: ClassVar[dict[str, Any]] = {
        "steps": 50,
        "method": "gausslegendre",
        "baseline": "black",
        "blur_sigma": 10.0,
        "internal_batch_size": None,
        "multi_target": "auto",
    }

    def _explain(self, model, x: torch.Tensor, targets: torch.Tensor) -> SaliencyResult:
        c = self.config
        mode = c["multi_target"]
        if mode == "auto":
            mode = "batched" if x.device.type == "cuda" else "loop"
        if mode not in ("loop", "batched"):
            raise ValueError(f"multi_target must be auto | loop | batched, got {mode!r}")
        alphas, weights = quadrature(c["method"], int(c["steps"]))
        m = len(alphas)
        b, k = targets.shape
        x = x.detach()
        base = make_baseline(x, c["baseline"], float(c["blur_sigma"])).detach()
        diff = x - base
        chunk = auto_chunk(model, x, m * b, c["internal_batch_size"])
        alpha_t = torch.tensor(alphas, dtype=x.dtype, device=x.device)
        weight_t = torch.tensor(weights, dtype=torch.float64, device=x.device)
        total = torch.zeros((b, k) + tuple(x.shape[1:]), dtype=torch.float64, device=x.device)
        # Rules with nodes at alpha = 0 / 1 (trapezoids, left, right) evaluate F(x') / F(x) on
        # the path itself: those outputs are kept for the completeness check (the node at
        # alpha = 1 is set to x exactly), and only the missing ends get an extra forward.
        first = [i for i, a in enumerate(alphas) if a == 0.0]
        last = [i for i, a in enumerate(alphas) if a == 1.0]
        f_base = torch.full((b, k), float("nan"), dtype=torch.float64, device=x.device)
        f_x = torch.full((b, k), float("nan"), dtype=torch.float64, device=x.device)
        # point p <-> (image p // m, step p % m)
        n_points = b * m
        for start in range(0, n_points, chunk):
            idx = torch.arange(start, min(start + chunk, n_points), device=x.device)
            img, step = idx // m, idx % m
            pts, at_x = _path_points(x, base, diff, alpha_t, img, step, last)
            with torch.enable_grad():
                out = model.logits(pts).gather(1, targets[img])  # [n, K]
                grads = self._input_grads(out, pts, mode)  # [K, n, C, H, W]
            if first:
                sel = step == first[0]
                f_base[img[sel]] = out.detach()[sel].double()
            if last:
                f_x[img[at_x]] = out.detach()[at_x].double()
            scaled = grads.to(torch.float64) * weight_t[step].view(1, -1, 1, 1, 1)
            total.index_add_(0, img, scaled.transpose(0, 1))
            del out, grads, scaled, pts
        attributions = (total * diff.to(torch.float64).unsqueeze(1))  # [B, K, C, H, W]
        maps64 = attributions.sum(dim=2)
        need = ([] if last else [x]) + ([] if first else [base])
        if need:
            with torch.inference_mode():
                ends = model.logits(torch.cat(need, dim=0))
            if not last:
                f_x = ends[:b].gather(1, targets).double()
            if not first:
                f_base = ends[-b:].gather(1, targets).double()
        return _result(maps64, f_x, f_base)

    def explain_pairs(self, model, x: torch.Tensor, image_index: torch.Tensor,
                      target: torch.Tensor) -> SaliencyResult:
        """IG of ``P`` (image, target) pairs: the same numbers as
        ``explain(model, x[image_index], target[:, None])`` (maps ``[P, 1, H, W]``, extras
        ``[P, 1]``), with the path points of all pairs packed into shared chunks."""
        c = self.config
        alphas, weights = quadrature(c["method"], int(c["steps"]))
        m, p = len(alphas), int(target.shape[0])
        x = x.detach()
        image_index = image_index.to(x.device).long()
        target = target.to(x.device).long()
        base = make_baseline(x, c["baseline"], float(c["blur_sigma"])).detach()
        diff = x - base
        alpha_t = torch.tensor(alphas, dtype=x.dtype, device=x.device)
        weight_t = torch.tensor(weights, dtype=torch.float64, device=x.device)
        total = torch.zeros((p,) + tuple(x.shape[1:]), dtype=torch.float64, device=x.device)
        first = [i for i, a in enumerate(alphas) if a == 0.0]
        last = [i for i, a in enumerate(alphas) if a == 1.0]
        f_base = torch.full((p,), float("nan"), dtype=torch.float64, device=x.device)
        f_x = torch.full((p,), float("nan"), dtype=torch.float64, device=x.device)
        n_points = p * m
        chunk = auto_chunk(model, x, n_points, c["internal_batch_size"])
        # point q <-> (pair q // m, step q % m); each point is differentiated for its own target
        for start in range(0, n_points, chunk):
            idx = torch.arange(start, min(start + chunk, n_points), device=x.device)
            pair, step = idx // m, idx % m
            pts, at_x = _path_points(x, base, diff, alpha_t, image_index[pair], step, last)
            with torch.enable_grad():
                out = model.logits(pts).gather(1, target[pair, None])[:, 0]
                grads = torch.autograd.grad(out.sum(), pts)[0]
            if first:
                sel = step == first[0]
                f_base[pair[sel]] = out.detach()[sel].double()
            if last:
                f_x[pair[at_x]] = out.detach()[at_x].double()
            total.index_add_(0, pair, grads.to(torch.float64) * weight_t[step].view(-1, 1, 1, 1))
            del out, grads, pts
        maps64 = (total * diff[image_index].to(torch.float64)).sum(dim=1, keepdim=True)
        need = ([] if last else [x]) + ([] if first else [base])
        if need:
            with torch.inference_mode():
                ends = model.logits(torch.cat(need, dim=0)).double()
            b = x.shape[0]
            if not last:
                f_x = ends[:b][image_index, target]
            if not first:
                f_base = ends[-b:][image_index, target]
        return _result(maps64, f_x[:, None], f_base[:, None])

    @staticmethod
    def _input_grads(out: torch.Tensor, pts: torch.Tensor, mode: str) -> torch.Tensor:
        k = out.shape[1]
        if k == 1:
            return torch.autograd.grad(out[:, 0].sum(), pts)[0].unsqueeze(0)
        if mode == "batched":
            eye = torch.eye(k, dtype=out.dtype, device=out.device)
            go = eye.unsqueeze(1).expand(k, out.shape[0], k)
            return torch.autograd.grad(out, pts, go, is_grads_batched=True)[0]
        grads = [torch.autograd.grad(out[:, j].sum(), pts, retain_graph=j < k - 1)[0]
                 for j in range(k)]
        return torch.stack(grads)


def _path_points(x: torch.Tensor, base: torch.Tensor, diff: torch.Tensor, alpha_t: torch.Tensor,
                 img: torch.Tensor, step: torch.Tensor, last: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Path points ``x' + alpha (x - x')`` of images ``img`` at nodes ``step`` (the node at
    alpha = 1, when the rule has one, set to ``x`` exactly), ready for the backward; and the
    mask of the points at that node."""
    pts = base[img] + alpha_t[step].view(-1, 1, 1, 1) * diff[img]
    at_x = step == last[0] if last else torch.zeros_like(step, dtype=torch.bool)
    if last:
        pts[at_x] = x[img[at_x]]
    return pts.requires_grad_(True), at_x


def _result(maps64: torch.Tensor, f_x: torch.Tensor, f_base: torch.Tensor) -> SaliencyResult:
    """Float32 maps ``[B, K, H, W]`` and the completeness extras from float64 sums."""
    delta_f = f_x - f_base
    attribution_sum = maps64.sum(dim=(-2, -1))
    gap = (attribution_sum - delta_f).abs()
    maps = maps64.float()
    extras = {
        "completeness_gap": gap.float(),
        "delta_f": delta_f.float(),
        "attribution_sum": attribution_sum.float(),
    }
    return SaliencyResult(maps, maps, extras)
