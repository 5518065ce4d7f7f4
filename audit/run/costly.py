"""The costly metric families for the sampled (image, finding) pairs of a batch: repeatability,
cascading randomization and deletion/insertion fidelity, for every saliency method of the run.

Batched: repeatability explains every method in one call per batch of inputs; the randomization
cascade re-explains every method of every pair of the batch from each randomized copy in one
pass (Grad-CAM and Grad-CAM++ share one forward; IG packs the path points of all pairs); the
fidelity curves of all pairs and methods (the random order's once per pair) are scored in
shared chunks. Each map depends only on its own image and target (the network is in eval mode),
so the figures are those of one pair at a time up to float rounding of other batch compositions
(tests/test_run_batched.py::test_costly_metrics_of_a_batch_equal_the_one_pair_path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from audit.config import AuditSettings
from audit.metrics import fidelity, randomization, repeatability
from audit.run.images import LoadedImage
from audit.saliency import explain_all


@dataclass
class CostlyPair:
    """One sampled (image, finding): its maps (``{method: SaliencyResult}`` of the image, the
    pair's map at position ``k[method]``), its boxes in the model's frame and the pointing
    tolerance."""

    item: LoadedImage
    finding: str
    results: dict[str, Any]
    k: dict[str, int | None]
    boxes: np.ndarray
    tolerance_px: float

    def original(self, method: str) -> np.ndarray:
        return self.results[method].maps[0, self.k[method]].detach().float().cpu().numpy()

    def tag(self, method: str) -> dict[str, str]:
        return {"image_key": self.item.key, "finding": self.finding, "method": method}


Figures = dict[tuple[str, str, str], dict[str, float]]


def costly_metrics(model: Any, pairs: list[CostlyPair], settings: AuditSettings
                   ) -> tuple[Figures, list[dict[str, Any]]]:
    """``({(image_key, finding, method): figures}, curve rows)`` for the batch's pairs."""
    figures: Figures = {(p.item.key, p.finding, m): {} for p in pairs for m in settings.methods}
    curves: list[dict[str, Any]] = []
    if not pairs or not settings.methods:
        return figures, curves
    if "repeatability" in settings.metrics:
        _repeatability(model, pairs, settings, figures)
    if "randomization" in settings.metrics:
        curves += _randomization(model, pairs, settings, figures)
    if "fidelity" in settings.metrics:
        curves += _fidelity(model, pairs, settings, figures)
    return figures, curves


def _repeatability(model: Any, pairs: list[CostlyPair], settings: AuditSettings,
                   figures: Figures) -> None:
    """Every pair's image explained twice in one batch (determinism), then each pair's three
    `repeatability.perturbed_copies` in a batch of their own (the composition of the one-pair
    path: IG on a random-init network moves by ~1e-3 of its maximum with the batch around
    it); each call explains every method, so Grad-CAM and Grad-CAM++ share its forward."""
    methods = list(settings.methods)
    options = settings.saliency_options()
    x = torch.stack([p.item.tensor for p in pairs]).to(model.device)
    targets = torch.tensor([[model.finding_index(p.finding)] for p in pairs],
                           device=model.device)

    def explain(images: torch.Tensor, columns: torch.Tensor) -> dict[str, np.ndarray]:
        results = explain_all(model, images, columns, methods, **options)
        return {m: results[m].maps[:, 0].detach().float().cpu().numpy() for m in methods}

    reference, again = explain(x, targets), explain(x, targets)
    for n, p in enumerate(pairs):
        copies = repeatability.perturbed_copies(
            p.item.tensor.to(model.device), p.boxes, noise_sigma=settings.noise_sigma * 2048.0,
            shift_px=settings.shift_px, seed=settings.seed)
        perturbed = explain(copies.images, targets[n:n + 1].expand(len(copies.images), 1))
        for m in methods:
            figures[(p.item.key, p.finding, m)].update(repeatability.figures_from_maps(
                reference[m][n], again[m][n], perturbed[m], copies, p.original(m),
                threshold=settings.threshold, tolerance_px=p.tolerance_px))


def _randomization(model: Any, pairs: list[CostlyPair], settings: AuditSettings,
                   figures: Figures) -> list[dict[str, Any]]:
    """One cascade for all pairs: image ``n`` of the cascade is pair ``n``, target ``j`` is
    method ``j`` (every column holds the pair's finding)."""
    methods = list(settings.methods)
    options = settings.saliency_options()
    x = torch.stack([p.item.tensor for p in pairs]).to(model.device)
    out = [model.finding_index(p.finding) for p in pairs]
    targets = torch.tensor([[o] * len(methods) for o in out], device=model.device)
    original = np.stack([np.stack([p.original(m) for m in methods]) for p in pairs])

    def explain_fn(net: torch.nn.Module, images: torch.Tensor,
                   columns: torch.Tensor) -> np.ndarray:
        results = explain_all(model.with_net(net), images, columns[:, :1], methods, **options)
        return np.stack([results[m].maps[:, 0].detach().float().cpu().numpy()
                         for m in methods], axis=1)

    blocks = settings.randomization_blocks or list(randomization.DENSENET_CASCADE)
    cascade = randomization.cascading_randomization(
        model.net, x, targets, explain_fn, seed=settings.seed, blocks=blocks,
        original_maps=original)
    rows: list[dict[str, Any]] = []
    for (n, j), part in cascade.groupby(["image_index", "target_index"], sort=True):
        pair, method = pairs[int(n)], methods[int(j)]
        figures[(pair.item.key, pair.finding, method)].update(
            randomization.randomization_figures(part))
        rows += [{**pair.tag(method), **{c: row[c] for c in ("family", "step", "x", "label",
                                                              "metric", "value")}}
                 for row in randomization.curve_long_rows(part)]
    return rows


def _fidelity(model: Any, pairs: list[CostlyPair], settings: AuditSettings,
              figures: Figures) -> list[dict[str, Any]]:
    """Deletion/insertion curves of every pair x method in saliency order, and of every pair
    in the seeded random order, in shared chunks. The random order does not depend on the map
    (`fidelity.pixel_order`), so its curve, computed once per pair, is every method's."""
    methods = list(settings.methods)
    keys = [(p, [m], "saliency") for p in pairs for m in methods]
    keys += [(p, methods, "random") for p in pairs]
    specs = [fidelity.CurveSpec(p.item.tensor.to(model.device), p.original(ms[0]), order=order,
                                seed=settings.seed) for p, ms, order in keys]
    out_index = torch.tensor([model.finding_index(p.finding) for p, _ms, _o in keys],
                             device=model.device)

    def predict(batch: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        probs = model.probabilities(batch)
        return probs[torch.arange(len(which), device=probs.device), out_index[which]]

    curves = fidelity.deletion_insertion_curves_many(
        predict, specs, step_fraction=settings.fidelity_step,
        baseline=settings.fidelity_baseline, batch_size=settings.fidelity_batch_size)
    rows: list[dict[str, Any]] = []
    for (pair, shared_by, _order), curve in zip(keys, curves, strict=True):
        for method in shared_by:
            figures[(pair.item.key, pair.finding, method)].update(curve.figures())
            rows += [{**pair.tag(method), "label": "", "metric": "probability", **row}
                     for row in curve.long_rows()]
    return rows
