"""Model-parameter randomization test (Adebayo et al. 2018, "Sanity checks for saliency maps").

A saliency method that explains the model must give different maps once the model's learned
parameters are destroyed. ``cascading_randomization`` re-initializes the network block by block
from the classifier down (``DENSENET_CASCADE``), re-explaining after every step;
``independent_randomization`` re-initializes one block at a time (the others keep their
values); ``fully_random_ssim`` compares with a completely re-initialized network (Arun et al.
2021). All work on a deep copy: the caller's network is never modified.

Re-initialization ("a freshly constructed block"), per module inside the block:
* ``Conv2d``: weight ~ kaiming normal (fan_in, ReLU gain, torchxrayvision/torchvision's own
  DenseNet init); bias (if any) = 0.
* ``Linear``: weight ~ N(0, 1/fan_in); bias = 0.
* ``BatchNorm``: weight = 1, bias = 0 and, with ``reset_bn_stats=True`` (default), running mean
  = 0, running var = 1, num_batches_tracked = 0. Running statistics are learned from data, so
  keeping them would keep trained information; the option exists for comparison.
  Consequence: a BN-only step (``features.norm5``, ``features.norm0``) is deterministic and is a
  no-op on a network that is itself at initialization.
* Any other module with its own parameters: its ``reset_parameters()`` under a forked torch RNG
  seeded from the block's generator.
Random numbers are drawn on the CPU from a ``torch.Generator`` seeded from ``(seed, block
name)`` (``block_generator``) and copied to the parameter's device, so a block gets the same
weights in cascading and independent mode and on any device.

Similarity of each new map to the original map of the same image and target:
``spearman`` (signed maps), ``spearman_abs`` (absolute values), ``ssim`` and
``hog_similarity`` (on absolute-value maps scaled to [0, 1]; see ``similarity``).
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from audit.metrics.similarity import hog_similarity, spearman, ssim

__all__ = [
    "DENSENET_CASCADE",
    "DENSENET_CASCADE_SHORT",
    "block_generator",
    "randomize_module",
    "map_similarities",
    "cascading_randomization",
    "independent_randomization",
    "fully_random_ssim",
    "randomization_flag",
    "SIMILARITY_METRICS",
    "curve_long_rows",
    "randomization_figures",
]

SIMILARITY_METRICS: tuple[str, ...] = ("spearman", "spearman_abs", "ssim", "hog_similarity")

#: Top-down cascade for torchxrayvision's DenseNet-121 (norm5 is its own step: it is the
#: Grad-CAM target layer and holds learned affine parameters and running statistics).
DENSENET_CASCADE: tuple[str, ...] = (
    "classifier",
    "features.norm5",
    "features.denseblock4",
    "features.transition3",
    "features.denseblock3",
    "features.transition2",
    "features.denseblock2",
    "features.transition1",
    "features.denseblock1",
    "features.norm0",
    "features.conv0",
)
#: A coarse 4-step cascade for quick checks and tests (same order, fewer re-explanations).
DENSENET_CASCADE_SHORT: tuple[str, ...] = (
    "classifier",
    "features.denseblock4",
    "features.denseblock3",
    "features.conv0",
)

ExplainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], "np.ndarray | torch.Tensor"]


def block_generator(seed: int, module_name: str) -> torch.Generator:
    """CPU generator seeded from ``(seed, crc32(module_name))``."""
    state = np.random.SeedSequence([int(seed), zlib.crc32(module_name.encode())])
    return torch.Generator(device="cpu").manual_seed(
        int(state.generate_state(1, np.uint64)[0] >> 1)
    )


def _fill_(param: torch.Tensor, values: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(values.to(device=param.device, dtype=param.dtype))


def _reinit_leaf(m: nn.Module, gen: torch.Generator, reset_bn_stats: bool) -> None:
    if isinstance(m, nn.modules.conv._ConvNd):
        w = torch.empty(m.weight.shape, dtype=torch.float32)
        nn.init.kaiming_normal_(w, nonlinearity="relu", generator=gen)
        _fill_(m.weight, w)
        if m.bias is not None:
            with torch.no_grad():
                m.bias.zero_()
    elif isinstance(m, nn.Linear):
        fan_in = m.weight.shape[1]
        w = torch.randn(m.weight.shape, generator=gen) / np.sqrt(fan_in)
        _fill_(m.weight, w)
        if m.bias is not None:
            with torch.no_grad():
                m.bias.zero_()
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        with torch.no_grad():
            if m.weight is not None:
                m.weight.fill_(1.0)
            if m.bias is not None:
                m.bias.zero_()
        if reset_bn_stats and m.track_running_stats:
            m.reset_running_stats()
    elif any(True for _ in m.parameters(recurse=False)):
        if not hasattr(m, "reset_parameters"):
            raise TypeError(f"cannot re-initialize module of type {type(m).__name__}")
        seed = int(torch.randint(0, 2**62, (1,), generator=gen).item())
        devices = [p.device for p in m.parameters(recurse=False) if p.device.type == "cuda"]
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            m.reset_parameters()


def randomize_module(
    net: nn.Module,
    module_name: str,
    generator: torch.Generator | None = None,
    *,
    reset_bn_stats: bool = True,
) -> int:
    """Re-initialize every parameter of ``net.get_submodule(module_name)`` in place.

    ``module_name=""`` is the whole network. ``generator`` defaults to
    ``block_generator(0, module_name)``. Returns the number of parameter elements
    re-initialized. Modules are visited in registration order (deterministic).
    """
    target = net.get_submodule(module_name) if module_name else net
    gen = generator if generator is not None else block_generator(0, module_name)
    for m in target.modules():
        _reinit_leaf(m, gen, reset_bn_stats)
    return int(sum(p.numel() for p in target.parameters()))


def _explain_np(explain_fn: ExplainFn, net, x, targets) -> np.ndarray:
    out = explain_fn(net, x, targets)
    if isinstance(out, torch.Tensor):
        out = out.detach().float().cpu().numpy()
    out = np.asarray(out, dtype=np.float64)
    if out.ndim != 4:
        raise ValueError(f"explain_fn must return [B, K, H, W], got {out.shape}")
    return out


def map_similarities(map_orig, map_new) -> dict[str, float]:
    """``spearman, spearman_abs, ssim, hog_similarity`` of a new map to the original."""
    return {
        "spearman": spearman(map_orig, map_new),
        "spearman_abs": spearman(map_orig, map_new, absolute=True),
        "ssim": ssim(map_orig, map_new, normalize="abs"),
        "hog_similarity": hog_similarity(map_orig, map_new, normalize="abs"),
    }


def _rows(step, block, frac, orig, new, targets) -> list[dict]:
    t = targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    t = t.reshape(orig.shape[0], -1)
    rows = []
    for b in range(orig.shape[0]):
        for k in range(orig.shape[1]):
            rows.append(
                {
                    "step": step,
                    "block": block,
                    "fraction_randomized": frac,
                    "image_index": b,
                    "target_index": k,
                    "target": int(t[b, k]),
                    **map_similarities(orig[b, k], new[b, k]),
                }
            )
    return rows


def _working_copy(net: nn.Module) -> nn.Module:
    work = copy.deepcopy(net)
    work.eval()
    return work


def _total_params(net: nn.Module) -> int:
    return int(sum(p.numel() for p in net.parameters()))


def _start(net: nn.Module, x: torch.Tensor, targets: torch.Tensor, explain_fn: ExplainFn,
           original_maps: np.ndarray | None) -> tuple[nn.Module, np.ndarray, int, list[dict]]:
    """A working copy, the original maps, the parameter count and the step-0 rows."""
    work = _working_copy(net)
    orig = (np.asarray(original_maps, dtype=np.float64) if original_maps is not None
            else _explain_np(explain_fn, work, x, targets))
    return work, orig, _total_params(work), _rows(0, "", 0.0, orig, orig, targets)


def cascading_randomization(
    net: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    explain_fn: ExplainFn,
    seed: int = 0,
    blocks: Sequence[str] = DENSENET_CASCADE,
    reset_bn_stats: bool = True,
    original_maps: np.ndarray | None = None,
) -> pd.DataFrame:
    """Randomize ``blocks`` cumulatively in the given order, re-explaining after each step.

    ``explain_fn(net, x, targets) -> [B, K, H, W]``. Returns one row per step x image x
    target: ``step`` (0 = original, compared with itself), ``block`` ("" at step 0),
    ``fraction_randomized`` (cumulative share of the network's parameter elements),
    ``image_index, target_index, target, spearman, spearman_abs, ssim, hog_similarity``.
    ``original_maps`` skips the first explanation when the caller already has it.
    """
    work, orig, total, rows = _start(net, x, targets, explain_fn, original_maps)
    done = 0
    for i, name in enumerate(blocks, start=1):
        done += randomize_module(
            work, name, block_generator(seed, name), reset_bn_stats=reset_bn_stats
        )
        new = _explain_np(explain_fn, work, x, targets)
        rows += _rows(i, name, done / total, orig, new, targets)
    return pd.DataFrame(rows)


def independent_randomization(
    net: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    explain_fn: ExplainFn,
    seed: int = 0,
    blocks: Sequence[str] = DENSENET_CASCADE,
    reset_bn_stats: bool = True,
    original_maps: np.ndarray | None = None,
) -> pd.DataFrame:
    """Randomize one block at a time (the rest keep the caller's values); same columns as
    ``cascading_randomization``, ``fraction_randomized`` is that block's share alone."""
    work, orig, total, rows = _start(net, x, targets, explain_fn, original_maps)
    for i, name in enumerate(blocks, start=1):
        module = work.get_submodule(name)
        saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
        n = randomize_module(work, name, block_generator(seed, name), reset_bn_stats=reset_bn_stats)
        new = _explain_np(explain_fn, work, x, targets)
        rows += _rows(i, name, n / total, orig, new, targets)
        module.load_state_dict(saved)
    return pd.DataFrame(rows)


def fully_random_ssim(
    net: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    explain_fn: ExplainFn,
    seed: int = 0,
    reset_bn_stats: bool = True,
    original_maps: np.ndarray | None = None,
) -> np.ndarray:
    """SSIM ``[B, K]`` between the maps of ``net`` and of a fully re-initialized copy."""
    work = _working_copy(net)
    orig = (
        np.asarray(original_maps, dtype=np.float64)
        if original_maps is not None
        else _explain_np(explain_fn, work, x, targets)
    )
    randomize_module(work, "", block_generator(seed, ""), reset_bn_stats=reset_bn_stats)
    new = _explain_np(explain_fn, work, x, targets)
    out = np.empty(orig.shape[:2])
    for b in range(orig.shape[0]):
        for k in range(orig.shape[1]):
            out[b, k] = ssim(orig[b, k], new[b, k], normalize="abs")
    return out


def randomization_flag(curve, metric: str = "spearman_abs", threshold: float = 0.5) -> bool:
    """True when the method FAILS the check: its maps survive randomization.

    ``curve``: a DataFrame from ``cascading_randomization`` (the rows of the last step are
    used; their mean over images and targets is compared) or a 1-D sequence of similarities
    in step order (the last value is used). Fails when that final similarity is
    ``>= threshold`` (default: |Spearman| 0.5) or is not finite (cannot show a drop).
    """
    if isinstance(curve, pd.DataFrame):
        last = curve[curve["step"] == curve["step"].max()]
        value = float(last[metric].mean())
    else:
        arr = np.asarray(curve, dtype=np.float64).ravel()
        if arr.size == 0:
            raise ValueError("empty curve")
        value = float(arr[-1])
    return bool(not np.isfinite(value) or value >= threshold)


def curve_long_rows(curve: pd.DataFrame, family: str = "randomization_cascade") -> list[dict]:
    """Long rows for the ``curves`` table: one per step x image x target x similarity metric,
    with ``family, step, x`` (= fraction_randomized), ``label`` (the block, "original" at step
    0), ``block, image_index, target_index, target, metric, value``."""
    rows = []
    for rec in curve.to_dict("records"):
        for metric in SIMILARITY_METRICS:
            rows.append(
                {
                    "family": family,
                    "step": int(rec["step"]),
                    "x": float(rec["fraction_randomized"]),
                    "label": rec["block"] or "original",
                    "block": rec["block"],
                    "image_index": int(rec["image_index"]),
                    "target_index": int(rec["target_index"]),
                    "target": int(rec["target"]),
                    "metric": metric,
                    "value": float(rec[metric]),
                }
            )
    return rows


def randomization_figures(curve: pd.DataFrame) -> dict[str, float]:
    """``randomization_final_<metric>`` for each similarity metric: the mean over images and
    targets at the last cascade step (the ``images`` table columns)."""
    last = curve[curve["step"] == curve["step"].max()]
    return {f"randomization_final_{m}": float(last[m].mean()) for m in SIMILARITY_METRICS}
