"""Batch-level explanation: every image of a batch with its own (ragged) list of targets, in one
call, together with the batch's logits.

* Grad-CAM / Grad-CAM++ at the default layer (closed form): ONE forward of the whole batch gives
  the activations, the logits (pooling and classifier applied to those activations, the same ops
  as ``model.logits``) and, in closed form, every map of every image and target.
* Integrated Gradients: the path points of all (image, target) pairs are packed into shared
  chunks (`IntegratedGradients.explain_pairs`; chunk size automatic unless configured).
* Baselines are cheap and explained image by image, exactly as ``explain_all`` on that image.

The result per image is what ``explain_all(model, x[b:b+1], [targets[b]], names)`` returns
(same numbers up to float rounding of different batch compositions; tests/test_saliency_batched.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from audit.saliency import get_method
from audit.saliency._cam import (
    CamInputs,
    closed_form_applies,
    closed_form_inputs,
    logits_from_features,
)
from audit.saliency.base import SaliencyResult, check_images
from audit.saliency.gradcam import GradCAM
from audit.saliency.integrated_gradients import IntegratedGradients

__all__ = ["BatchExplanation", "explain_batch"]


@dataclass
class BatchExplanation:
    """``logits [B, P]`` of the batch and, per image, ``{method: SaliencyResult}`` with maps
    ``[1, K, H, W]`` for the method's ``K`` targets of that image, listed in
    ``targets[method][b]`` (a method without targets on an image has no entry for it)."""

    logits: torch.Tensor
    results: list[dict[str, SaliencyResult]]
    targets: dict[str, list[list[int]]]

    def map_index(self, b: int, method: str, target: int) -> int | None:
        """Position of ``target`` among the targets ``method`` explained on image ``b``."""
        found = self.targets[method][b]
        return found.index(target) if target in found else None


def _padded_targets(targets: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """``[B, K_max]``: each row its targets, padded with its first one (0 for none); padded
    columns are computed and dropped (each map depends only on its own image and target)."""
    width = max([len(t) for t in targets] + [1])
    rows = [list(t) + [t[0] if len(t) else 0] * (width - len(t)) for t in targets]
    return torch.tensor(rows, dtype=torch.long, device=device)


def _split(result: SaliencyResult, counts: list[int]) -> list[SaliencyResult]:
    """Per-image results ``[1, K_b, ...]`` from a padded ``[B, K_max, ...]`` result."""
    return [SaliencyResult(result.maps[b:b + 1, :k], result.raw[b:b + 1, :k],
                           {n: v[b:b + 1, :k] for n, v in result.extras.items()})
            for b, k in enumerate(counts)]


def _cam_results(model: Any, x: torch.Tensor, padded: torch.Tensor,
                 methods: dict[str, GradCAM]) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """CAM results ``{name: [B, K_max] result}`` and the logits when a closed-form forward gave
    them (None otherwise)."""
    logits = None
    shared: dict[tuple, CamInputs] = {}
    out: dict[str, SaliencyResult] = {}
    size = (int(x.shape[-2]), int(x.shape[-1]))
    for name, method in methods.items():
        cfg = method.config
        key = (cfg["target_layer"], cfg["pre_relu"], cfg["closed_form"])
        if key not in shared:
            closed = cfg["closed_form"] is True or (
                cfg["closed_form"] == "auto"
                and closed_form_applies(model, cfg["target_layer"], cfg["pre_relu"]))
            if closed:
                with torch.inference_mode():
                    acts = model.features(x)
                logits = logits_from_features(model, acts) if logits is None else logits
                shared[key] = closed_form_inputs(model, acts, padded, size)
            else:
                shared[key] = method.cam_inputs(model, x, padded)
        out[name] = method.from_cam_inputs(shared[key])
    return logits, out


def _ig_results(model: Any, x: torch.Tensor, targets: Sequence[Sequence[int]],
                method: IntegratedGradients) -> list[SaliencyResult]:
    counts = [len(t) for t in targets]
    image_index = torch.tensor([b for b, k in enumerate(counts) for _ in range(k)],
                               dtype=torch.long, device=x.device)
    flat = torch.tensor([t for row in targets for t in row], dtype=torch.long, device=x.device)
    if not len(flat):
        return [SaliencyResult(x.new_zeros((1, 0) + tuple(x.shape[-2:])),
                               x.new_zeros((1, 0) + tuple(x.shape[-2:])), {})
                for _ in counts]
    pairs = method.explain_pairs(model, x, image_index, flat)
    results, start = [], 0
    for k in counts:
        sl = slice(start, start + k)
        results.append(SaliencyResult(pairs.maps[sl, 0][None], pairs.raw[sl, 0][None],
                                      {n: v[sl, 0][None] for n, v in pairs.extras.items()}))
        start += k
    return results


def explain_batch(model: Any, x: torch.Tensor, targets: Sequence[Sequence[int]],
                  method_names: Sequence[str],
                  method_targets: Mapping[str, Sequence[Sequence[int]]] | None = None,
                  **options: Any) -> BatchExplanation:
    """Logits of ``x [B, 1, H, W]`` and the maps of ``method_names`` for ``targets[b]`` (model
    output indices, any number per image) of each image ``b``; ``method_targets`` gives some
    methods their own target lists instead (e.g. IG on a sample of the pairs)."""
    x = check_images(x).to(model.device)
    own = {n: [list(t) for t in (method_targets or {}).get(n, targets)] for n in method_names}
    for name, lists in own.items():
        if len(lists) != x.shape[0]:
            raise ValueError(f"{len(lists)} target lists for {x.shape[0]} images ({name})")
    methods = {name: get_method(name, **options) for name in method_names}
    cams = {n: m for n, m in methods.items() if isinstance(m, GradCAM)}
    logits, cam = None, {}
    for group in _same_targets(cams, own):
        group_logits, found = _cam_results(model, x, _padded_targets(own[group[0]], x.device),
                                           {n: cams[n] for n in group})
        logits = group_logits if logits is None else logits
        cam.update(found)
    if logits is None:
        with torch.inference_mode():
            logits = model.logits(x)
    per_image: list[dict[str, SaliencyResult]] = [{} for _ in range(x.shape[0])]
    for name, method in methods.items():
        counts = [len(t) for t in own[name]]
        if name in cam:
            split = _split(cam[name], counts)
        elif isinstance(method, IntegratedGradients):
            split = _ig_results(model, x, own[name], method)
        else:
            split = [method.explain(model, x[b:b + 1], [t]) if t else None
                     for b, t in enumerate(own[name])]
        for b, result in enumerate(split):
            if counts[b]:
                per_image[b][name] = result
    return BatchExplanation(logits=logits, results=per_image, targets=own)


def _same_targets(cams: dict[str, GradCAM], own: dict[str, list[list[int]]]
                  ) -> list[list[str]]:
    """CAM methods grouped by identical target lists (each group shares one forward)."""
    groups: list[list[str]] = []
    for name in cams:
        for group in groups:
            if own[group[0]] == own[name]:
                group.append(name)
                break
        else:
            groups.append([name])
    return groups
