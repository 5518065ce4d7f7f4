"""Saliency methods behind one interface (see ``docs/interfaces.md``).

``get_method(name, **options).explain(model, x[B,1,H,W], targets[B,K]) -> SaliencyResult``;
``explain_all(model, x, targets, names, **options)`` runs several, sharing the forward of
Grad-CAM and Grad-CAM++.

Options form one flat namespace so that a caller can pass the same settings to every method:
each method takes its own options either bare (``steps``) or with its prefix (``ig_steps``);
options that belong to another method are ignored; a name no method knows raises ``TypeError``.
"""

from __future__ import annotations

from typing import Any

import torch

from audit.model import ModelLike
from audit.protocol import BASELINE_NAMES, METHOD_NAMES, method_kind
from audit.saliency.base import SaliencyMethod, SaliencyResult, as_target_matrix, check_images
from audit.saliency.baselines import AverageBox, CentrePrior, RandomMap
from audit.saliency.gradcam import GradCAM
from audit.saliency.gradcampp import GradCAMPlusPlus
from audit.saliency.integrated_gradients import IntegratedGradients

__all__ = [
    "SaliencyMethod",
    "SaliencyResult",
    "METHODS",
    "METHOD_NAMES",
    "BASELINE_NAMES",
    "get_method",
    "explain_all",
]

METHODS: dict[str, type[SaliencyMethod]] = {
    cls.name: cls
    for cls in (GradCAM, GradCAMPlusPlus, IntegratedGradients, RandomMap, CentrePrior, AverageBox)
}
if set(METHODS) != set(METHOD_NAMES) | set(BASELINE_NAMES) or any(
        METHODS[n].kind != method_kind(n) for n in METHODS):
    raise ImportError("the saliency registry disagrees with audit.protocol's method names")


def _own_options(cls: type[SaliencyMethod], options: dict[str, Any]) -> dict[str, Any]:
    known_anywhere = set()
    for other in METHODS.values():
        known_anywhere.update(other.options)
        known_anywhere.update(other.prefix + o for o in other.options)
    mine: dict[str, Any] = {}
    for key, value in options.items():
        if key in cls.options:
            mine[key] = value
        elif cls.prefix and key.startswith(cls.prefix) and key[len(cls.prefix):] in cls.options:
            mine[key[len(cls.prefix):]] = value
        elif key not in known_anywhere:
            raise TypeError(f"unknown saliency option {key!r}")
    return mine


def get_method(name: str, **options: Any) -> SaliencyMethod:
    """A configured method by name: gradcam, gradcampp, integrated_gradients, random,
    centre_prior, average_box."""
    if name not in METHODS:
        raise ValueError(f"unknown saliency method {name!r}; known: {', '.join(METHODS)}")
    cls = METHODS[name]
    return cls(**_own_options(cls, options))


def explain_all(model: ModelLike, x: torch.Tensor, targets, method_names, **options: Any
                ) -> dict[str, SaliencyResult]:
    """``{name: SaliencyResult}`` for each method; Grad-CAM and Grad-CAM++ with the same target
    layer settings share one forward (and, off the closed form, one backward)."""
    x = check_images(x).to(model.device)
    t = as_target_matrix(targets, x.shape[0], x.device)
    methods = {name: get_method(name, **options) for name in method_names}
    results: dict[str, SaliencyResult] = {}
    shared: dict[tuple, Any] = {}
    for name, method in methods.items():
        if isinstance(method, GradCAM):
            cfg = method.config
            key = (cfg["target_layer"], cfg["pre_relu"], cfg["closed_form"])
            if key not in shared:
                shared[key] = method.cam_inputs(model, x, t)
            results[name] = method.from_cam_inputs(shared[key])
        else:
            results[name] = method._explain(model, x, t)
    return results
