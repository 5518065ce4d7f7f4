"""Repeatability of saliency maps: determinism, test-retest under small perturbations,
replicates (Arun et al. 2021).

* ``determinism_max_abs_diff``: the same input twice must give the same map (0 on CPU).
* Test-retest: perturb the input (``gaussian_noise_perturbation``, ``shift_image_and_boxes``),
  re-explain, then ``test_retest_scores`` compares the two maps (SSIM, Spearman) and their
  localization (IoU change, pointing-hit change). For a shift the perturbed map is shifted
  back before the similarity is computed (an equivariant explainer then scores 1).
* Replicates: ``replicate_ssim`` = mean SSIM over all pairs of maps produced by several
  checkpoints of the same architecture for the same image and target.
* ``repeatability_figures``: the per-image figures of a run (``images`` table columns).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from audit.metrics.localization import localization_scores
from audit.metrics.maps import as_boxes
from audit.metrics.pointing import pointing_game_hit, pointing_tolerance_px
from audit.metrics.similarity import Normalization, spearman, ssim
from audit.protocol import DEFAULT_THRESHOLD

__all__ = [
    "determinism_max_abs_diff",
    "gaussian_noise_perturbation",
    "shift_image",
    "shift_image_and_boxes",
    "test_retest_scores",
    "test_retest_table",
    "replicate_ssim",
    "replicate_ssim_batch",
    "repeatability_figures",
]


def _to_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def determinism_max_abs_diff(map_a, map_b) -> float:
    """``max |a - b|`` over all elements (any shape, numpy or torch).

    NaN at the same position in both counts as equal; a NaN on one side only, or infinities
    that differ, give ``inf``. Shapes must match.
    """
    a = _to_numpy(map_a).astype(np.float64)
    b = _to_numpy(map_b).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):
        d = np.abs(a - b)
    d = np.where(same, 0.0, d)
    d = np.where(np.isnan(d), np.inf, d)
    return float(d.max())


def gaussian_noise_perturbation(image, sigma: float, rng: np.random.Generator):
    """``image + sigma * N(0, 1)`` with the noise drawn from the numpy ``rng``.

    ``sigma`` is in the image's own units (torchxrayvision range [-1024, 1024]: e.g. 0.01 of
    the range is sigma = 20.48). Returns the same type (numpy or torch, same dtype/device).
    """
    if sigma < 0:
        raise ValueError("sigma must be >= 0")
    shape = tuple(image.shape)
    noise = rng.standard_normal(shape) * float(sigma)
    if hasattr(image, "detach"):
        import torch

        return image + torch.as_tensor(noise, dtype=image.dtype, device=image.device)
    img = np.asarray(image)
    return (img + noise).astype(img.dtype if np.issubdtype(img.dtype, np.floating) else np.float64)


def _shift_index(n: int, d: int) -> np.ndarray:
    # new[i] = old[clip(i - d)]: content moves by +d, edges replicated.
    return np.clip(np.arange(n) - d, 0, n - 1)


def shift_image(image, dx: int, dy: int):
    """Shift the last two axes (H, W) by integer ``(dx, dy)`` pixels with edge padding.

    Content moves right by ``dx`` and down by ``dy``; the uncovered border repeats the
    nearest edge pixel. Works on numpy arrays and torch tensors ``[..., H, W]``.
    """
    dx, dy = int(dx), int(dy)
    h, w = image.shape[-2], image.shape[-1]
    ri, ci = _shift_index(h, dy), _shift_index(w, dx)
    if hasattr(image, "detach"):
        import torch

        ri_t = torch.as_tensor(ri, device=image.device)
        ci_t = torch.as_tensor(ci, device=image.device)
        return image.index_select(-2, ri_t).index_select(-1, ci_t)
    img = np.asarray(image)
    return img[..., ri, :][..., ci]


def shift_image_and_boxes(image, boxes, dx: int, dy: int):
    """``(shifted image, shifted boxes)``: boxes move by ``(dx, dy)`` and are clipped to the
    frame ``[0, W] x [0, H]`` (the part shifted out of the frame is gone with the content).
    """
    h, w = image.shape[-2], image.shape[-1]
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    x0 = np.clip(b[:, 0] + dx, 0, w)
    y0 = np.clip(b[:, 1] + dy, 0, h)
    x1 = np.clip(b[:, 0] + b[:, 2] + dx, 0, w)
    y1 = np.clip(b[:, 1] + b[:, 3] + dy, 0, h)
    out = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)
    return shift_image(image, dx, dy), out


def test_retest_scores(
    map_orig,
    map_perturbed,
    boxes_orig,
    boxes_perturbed,
    shift: tuple[int, int] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    tolerance_px: float | None = None,
    normalize: Normalization = "minmax",
) -> dict:
    """Compare a map with the map of a perturbed input.

    ``shift=(dx, dy)``: the input was shifted by that much; the perturbed map is shifted by
    ``(-dx, -dy)`` (edge padding) before SSIM/Spearman. Localization is scored in each map's
    own frame against its own boxes. Returns ``ssim, spearman, iou_orig, iou_perturbed,
    delta_iou, iobb_orig, iobb_perturbed, delta_iobb, hit_orig, hit_perturbed, hit_changed``
    (hits = pointing game).
    """
    a = _to_numpy(map_orig).astype(np.float64)
    b = _to_numpy(map_perturbed).astype(np.float64)
    if tolerance_px is None:
        tolerance_px = pointing_tolerance_px(a.shape[1])
    b_aligned = shift_image(b, -shift[0], -shift[1]) if shift else b
    lo = localization_scores(a, as_boxes(boxes_orig), threshold)
    lp = localization_scores(b, as_boxes(boxes_perturbed), threshold)
    ho = pointing_game_hit(a, boxes_orig, tolerance_px)
    hp = pointing_game_hit(b, boxes_perturbed, tolerance_px)
    return {
        "ssim": ssim(a, b_aligned, normalize=normalize),
        "spearman": spearman(a, b_aligned),
        "iou_orig": lo.iou,
        "iou_perturbed": lp.iou,
        "delta_iou": lp.iou - lo.iou,
        "iobb_orig": lo.iobb,
        "iobb_perturbed": lp.iobb,
        "delta_iobb": lp.iobb - lo.iobb,
        "hit_orig": ho,
        "hit_perturbed": hp,
        "hit_changed": ho != hp,
    }


def test_retest_table(
    maps_orig,
    maps_perturbed,
    boxes_orig: Sequence,
    boxes_perturbed: Sequence,
    shift: tuple[int, int] | None = None,
    **kwargs,
) -> pd.DataFrame:
    """Batched ``test_retest_scores`` over ``[N, H, W]`` map stacks: one row per map."""
    a = _to_numpy(maps_orig)
    b = _to_numpy(maps_perturbed)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"need two [N, H, W] stacks of one shape, got {a.shape}, {b.shape}")
    rows = []
    for i in range(a.shape[0]):
        r = test_retest_scores(a[i], b[i], boxes_orig[i], boxes_perturbed[i], shift, **kwargs)
        rows.append({"map_index": i, **r})
    return pd.DataFrame(rows)


# Not a test: keep pytest from collecting the two functions above.
test_retest_scores.__test__ = False  # type: ignore[attr-defined]
test_retest_table.__test__ = False  # type: ignore[attr-defined]


def replicate_ssim(maps_list: Sequence, normalize: Normalization = "minmax") -> float:
    """Mean SSIM over all unordered pairs of 2-D maps (``nan`` for fewer than two maps)."""
    maps = [_to_numpy(m) for m in maps_list]
    if len(maps) < 2:
        return float("nan")
    return float(np.mean([ssim(x, y, normalize=normalize) for x, y in combinations(maps, 2)]))


def replicate_ssim_batch(maps, normalize: Normalization = "minmax") -> np.ndarray:
    """``maps [R, N, H, W]`` (R replicates) -> ``[N]`` mean pairwise SSIM per map."""
    m = _to_numpy(maps)
    if m.ndim != 4:
        raise ValueError(f"expected [R, N, H, W], got {m.shape}")
    return np.array([replicate_ssim(list(m[:, i]), normalize) for i in range(m.shape[1])])


@dataclass
class Perturbed:
    """The three perturbed copies of one image that repeatability explains, in this order:
    noisy, shifted by ``(+s, +s)``, shifted by ``(-s, -s)``; and the boxes in each copy."""

    images: Any  # torch [3, C, H, W]
    boxes: tuple[np.ndarray, np.ndarray, np.ndarray]
    shift_px: int


def perturbed_copies(image, boxes, noise_sigma: float = 20.48, shift_px: int = 2,
                     seed: int = 0) -> Perturbed:
    """`Perturbed` of ``image`` (torch ``[C, H, W]``): noise
    ``gaussian_noise_perturbation(image, noise_sigma, default_rng(seed))`` and the two shifts
    (`shift_image_and_boxes`)."""
    import torch

    b = as_boxes(boxes)
    noisy = gaussian_noise_perturbation(image, noise_sigma, np.random.default_rng(seed))
    plus, boxes_plus = shift_image_and_boxes(image, b, shift_px, shift_px)
    minus, boxes_minus = shift_image_and_boxes(image, b, -shift_px, -shift_px)
    return Perturbed(torch.stack([noisy, plus, minus]), (b, boxes_plus, boxes_minus), shift_px)


def figures_from_maps(reference, again, perturbed_maps, perturbed: Perturbed,
                      original_map=None, threshold: float = DEFAULT_THRESHOLD,
                      tolerance_px: float | None = None) -> dict[str, float]:
    """The figures of `repeatability_figures` from its maps: ``reference`` and ``again`` (the
    image explained twice), ``perturbed_maps`` ``[3, H, W]`` (the maps of ``perturbed.images``)
    and the map that was scored (``original_map``; default: ``reference``)."""
    reference = _to_numpy(reference).astype(np.float64)
    maps = _to_numpy(perturbed_maps).astype(np.float64)
    base = reference if original_map is None else _to_numpy(original_map).astype(np.float64)
    b, boxes_plus, boxes_minus = perturbed.boxes
    s = perturbed.shift_px
    kw = dict(threshold=threshold, tolerance_px=tolerance_px)
    rn = test_retest_scores(base, maps[0], b, b, **kw)
    rp = test_retest_scores(base, maps[1], b, boxes_plus, shift=(s, s), **kw)
    rm = test_retest_scores(base, maps[2], b, boxes_minus, shift=(-s, -s), **kw)
    return {
        "determinism_max_abs_diff": determinism_max_abs_diff(
            reference, _to_numpy(again).astype(np.float64)),
        "noise_ssim": rn["ssim"],
        "noise_spearman": rn["spearman"],
        "noise_delta_iou": rn["delta_iou"],
        "noise_hit_changed": float(rn["hit_changed"]),
        "shift_ssim": float(np.mean([rp["ssim"], rm["ssim"]])),
        "shift_spearman": float(np.mean([rp["spearman"], rm["spearman"]])),
        "shift_delta_iou": float(np.mean([abs(rp["delta_iou"]), abs(rm["delta_iou"])])),
        "shift_hit_changed": float(np.mean([rp["hit_changed"], rm["hit_changed"]])),
    }


def repeatability_figures(
    explain_fn,
    net,
    image,
    target: int,
    boxes,
    original_map=None,
    threshold: float = DEFAULT_THRESHOLD,
    tolerance_px: float | None = None,
    noise_sigma: float = 20.48,
    shift_px: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    """Determinism and test-retest figures for one image and one target output index.

    ``explain_fn(net, x[B, C, H, W], targets[B, K]) -> [B, K, H, W]`` (numpy or torch);
    ``image``: torch ``[C, H, W]``; ``boxes``: the finding's boxes in the map's frame.
    Calls ``explain_fn`` three times: the image (reference), the image again (determinism),
    and one batch of the `perturbed_copies` [noisy, shifted by (+s, +s), shifted by (-s, -s)].
    The perturbed maps are compared with ``original_map`` when given (the map that was
    scored), else with the reference (`figures_from_maps`). Returns
    ``determinism_max_abs_diff, noise_ssim, noise_spearman, noise_delta_iou,
    noise_hit_changed, shift_ssim, shift_spearman, shift_delta_iou, shift_hit_changed``: shift
    figures are means over the two shifts, ``shift_delta_iou`` the mean of |IoU change| and
    ``*_hit_changed`` the share of perturbations that flip the pointing-game outcome (0, 0.5
    or 1 for shifts).
    """
    import torch

    x = image.unsqueeze(0)
    t = torch.tensor([[int(target)]], device=image.device)

    def run(batch):
        out = explain_fn(net, batch, t.expand(batch.shape[0], 1))
        return _to_numpy(out).astype(np.float64)[:, 0]

    reference = run(x)[0]
    again = run(x)[0]
    perturbed = perturbed_copies(image, boxes, noise_sigma, shift_px, seed)
    return figures_from_maps(reference, again, run(perturbed.images), perturbed, original_map,
                             threshold=threshold, tolerance_px=tolerance_px)
