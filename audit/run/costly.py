"""The costly metric families for one sampled (image, finding): repeatability, cascading
randomization and deletion/insertion fidelity, for every saliency method of the run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from audit.config import AuditSettings
from audit.metrics import fidelity, randomization, repeatability
from audit.run.images import LoadedImage
from audit.saliency import get_method


def costly_metrics(model: Any, item: LoadedImage, finding: str, results: dict[str, Any], k: int,
                   boxes: np.ndarray, tolerance_px: float, settings: AuditSettings
                   ) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """``({method: figures}, curve rows)`` for target ``k`` of ``results`` (the image's maps);
    ``boxes`` in the model's frame."""
    x = item.tensor.unsqueeze(0).to(model.device)
    out_index = model.finding_index(finding)
    target = torch.tensor([[out_index]], device=model.device)
    options = settings.saliency_options()
    per_method: dict[str, dict[str, float]] = {}
    curves: list[dict[str, Any]] = []
    for method in settings.methods:
        explainer = get_method(method, **options)
        original = results[method].maps[0, k].detach().float().cpu().numpy()

        def explain_fn(net: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
                       _explainer: Any = explainer) -> np.ndarray:
            maps = _explainer.explain(model.with_net(net), images, targets).maps
            return maps.detach().float().cpu().numpy()

        tag = {"image_key": item.key, "finding": finding, "method": method}
        figures: dict[str, float] = {}
        if "repeatability" in settings.metrics:
            figures.update(repeatability.repeatability_figures(
                explain_fn=explain_fn, net=model.net, image=x[0], target=out_index,
                original_map=original, boxes=boxes, threshold=settings.threshold,
                tolerance_px=tolerance_px, noise_sigma=settings.noise_sigma * 2048.0,
                shift_px=settings.shift_px, seed=settings.seed))
        if "randomization" in settings.metrics:
            blocks = settings.randomization_blocks or list(randomization.DENSENET_CASCADE)
            cascade = randomization.cascading_randomization(
                model.net, x, target, explain_fn, seed=settings.seed, blocks=blocks,
                original_maps=original[None, None])
            curves += [{**tag, **{c: row[c] for c in ("family", "step", "x", "label", "metric",
                                                      "value")}}
                       for row in randomization.curve_long_rows(cascade)]
            figures.update(randomization.randomization_figures(cascade))
        if "fidelity" in settings.metrics:
            for order in ("saliency", "random"):
                curve = fidelity.deletion_insertion_curves(
                    _probability_of(model, out_index), x[0], original,
                    step_fraction=settings.fidelity_step, baseline=settings.fidelity_baseline,
                    order=order, seed=settings.seed, batch_size=settings.fidelity_batch_size)
                figures.update(curve.figures())
                curves += [{**tag, "label": "", "metric": "probability", **row}
                           for row in curve.long_rows()]
        per_method[method] = figures
    return per_method, curves


def _probability_of(model: Any, out_index: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def predict(batch: torch.Tensor) -> torch.Tensor:
        return model.probabilities(batch)[:, out_index]

    return predict
