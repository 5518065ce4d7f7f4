"""Integrated Gradients: quadrature rules, baselines, completeness, batching invariances.

Every test runs under 1 and 2 intra-op threads (``torch_threads``). Map comparisons are relative
to the reference map's maximum (``_close``, 1e-5): the maps are float32 sums over the path of
float64-accumulated gradients, so two evaluations that differ only in chunking, target grouping
or thread count agree to float32 rounding (~1e-7 of the maximum). A path point dropped or
counted twice moves a map by ~1/steps (> 1e-2); a gradient of the wrong target by O(1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audit.saliency import get_method
from audit.saliency.integrated_gradients import (
    BLACK,
    CAPTUM_RULES,
    QUADRATURE_RULES,
    gaussian_blur,
    make_baseline,
    quadrature,
)


class _Toy:
    """A stand-in for AuditModel: anything with ``.device`` and ``.logits(x) -> [B, P]``."""

    device = torch.device("cpu")

    def __init__(self, net):
        self.net = net

    def logits(self, x):
        return self.net(x)


def _linear_model(h=8, w=8, p=3, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(h * w, p)
    return _Toy(torch.nn.Sequential(torch.nn.Flatten(), lin)), lin


def _smooth_model(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Softplus(),
        torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Tanh(),
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16, 3))
    return _Toy(net.double().float())


def _images(b=2, size=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((b, 1, size, size), generator=g) * 2 - 1


pytestmark = pytest.mark.usefixtures("torch_threads")


def _close(a: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> bool:
    """``a`` equals ``ref`` to ``rel`` of ``ref``'s largest magnitude."""
    return (a - ref).abs().max().item() <= rel * ref.abs().max().item()


@pytest.mark.parametrize("rule", CAPTUM_RULES)
def test_quadrature_nodes_and_weights_equal_captums(rule):
    from captum.attr._utils.approximation_methods import approximation_parameters

    sizes_fn, alphas_fn = approximation_parameters(rule)
    for n in (2, 5, 16, 50):
        a, w = quadrature(rule, n)
        assert np.allclose(a, alphas_fn(n), rtol=0, atol=1e-7)
        assert np.allclose(w, sizes_fn(n), rtol=0, atol=1e-7)


def test_quadrature_weights_sum_to_one_except_captums_riemann_trapezoid():
    for rule in QUADRATURE_RULES:
        for n in (2, 5, 50):
            total = quadrature(rule, n)[1].sum()
            expected = 1.0 - 1.0 / n if rule == "riemann_trapezoid" else 1.0
            assert abs(total - expected) < 1e-12, (rule, n, total)


def test_integrated_gradients_are_exact_for_a_linear_model():
    model, lin = _linear_model()
    x = _images(2, 8)
    targets = torch.tensor([[0, 2], [1, 1]])
    w = lin.weight.detach().view(3, 8, 8)
    expected = w[targets] * (x - BLACK)  # [B, K, H, W]
    for rule in QUADRATURE_RULES:
        res = get_method("integrated_gradients", steps=4, method=rule).explain(model, x, targets)
        # exact for a linear model up to float32 rounding of w (x - x'), |x - x'| ~ 1024
        if rule == "riemann_trapezoid":  # Captum's rule: weights sum to 1 - 1/n
            assert _close(res.maps, expected * 0.75)
            continue
        assert _close(res.maps, expected)
        assert res.extras["completeness_gap"].max() < 1e-2


def test_gauss_legendre_reaches_trapezoid_completeness_with_a_third_of_the_steps():
    model = _smooth_model()
    x = _images(2, 12) * 3
    targets = torch.tensor([[0, 1], [2, 0]])

    def gap(rule, n):
        r = get_method("integrated_gradients", steps=n, method=rule, baseline="zeros") \
            .explain(model, x, targets)
        return r.extras["completeness_gap"].max().item()

    assert gap("gausslegendre", 16) <= gap("trapezoid", 50)
    assert gap("gausslegendre", 16) <= gap("riemann_trapezoid", 50)
    assert gap("trapezoid", 16) > gap("gausslegendre", 16)


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_trapezoid", "riemann_left",
                                  "riemann_right"])
def test_completeness_gap_and_delta_f_are_measured_per_map(rule):
    # (trapezoid/left/right take F(x') and/or F(x) from their path nodes at alpha = 0 / 1)
    model = _smooth_model()
    x = _images(2, 12)
    targets = torch.tensor([[0, 1], [2, 0]])
    res = get_method("integrated_gradients", steps=10, baseline="mean", method=rule,
                     internal_batch_size=7).explain(model, x, targets)
    base = make_baseline(x, "mean")
    with torch.no_grad():
        df = model.logits(x).gather(1, targets) - model.logits(base).gather(1, targets)
    assert res.maps.shape == (2, 2, 12, 12) and res.maps.dtype == torch.float32
    assert torch.allclose(res.extras["delta_f"], df, rtol=1e-5, atol=1e-6)
    s = res.maps.double().sum(dim=(-2, -1))
    assert torch.allclose(res.extras["attribution_sum"].double(), s, rtol=1e-5, atol=1e-6)
    assert torch.allclose(res.extras["completeness_gap"].double(), (s - df.double()).abs(),
                          rtol=1e-4, atol=1e-6)
    assert torch.equal(res.raw, res.maps)


def test_chunking_and_target_grouping_do_not_change_the_maps():
    model = _smooth_model()
    x = _images(3, 10)
    targets = torch.tensor([[0, 1], [2, 0], [1, 1]])
    ref = get_method("integrated_gradients", steps=7, internal_batch_size=1000).explain(
        model, x, targets)
    for chunk, mode in ((1, "loop"), (4, "batched"), (7, "loop"), (5, "batched")):
        r = get_method("integrated_gradients", steps=7, internal_batch_size=chunk,
                       multi_target=mode).explain(model, x, targets)
        assert _close(r.maps, ref.maps), (chunk, mode)
    # one target at a time, one image at a time: the same maps
    for b in range(3):
        for k in range(2):
            single = get_method("integrated_gradients", steps=7).explain(
                model, x[b:b + 1], targets[b:b + 1, k:k + 1])
            assert _close(single.maps[0, 0], ref.maps[b, k])


def test_loop_and_batched_backward_agree_on_densenet():
    from audit.model import load_model

    model = load_model(random_init=True, seed=0, device="cpu")
    x = _images(1, 64) * 1024
    targets = torch.tensor([[3, 7, 10]])
    loop = get_method("integrated_gradients", steps=2, method="gausslegendre",
                      multi_target="loop").explain(model, x, targets)
    batched = get_method("integrated_gradients", steps=2, method="gausslegendre",
                         multi_target="batched").explain(model, x, targets)
    scale = loop.maps.abs().max()
    assert (loop.maps - batched.maps).abs().max() <= 1e-5 * scale


def test_baselines_are_black_zeros_mean_blurred_or_given():
    x = _images(2, 16) * 1024
    assert torch.equal(make_baseline(x, "black"), torch.full_like(x, -1024.0))
    assert torch.equal(make_baseline(x, "zeros"), torch.zeros_like(x))
    mean = make_baseline(x, "mean")
    assert torch.allclose(mean[:, :, 0, 0], x.mean(dim=(-2, -1)))
    assert torch.equal(mean.amin(dim=(-2, -1)), mean.amax(dim=(-2, -1)))
    blurred = make_baseline(x, "blurred", blur_sigma=2.0)
    assert blurred.shape == x.shape and blurred.std() < x.std()
    flat = torch.full((1, 1, 16, 16), 7.0)
    assert torch.allclose(gaussian_blur(flat, 3.0), flat)
    assert torch.equal(make_baseline(x, 5.0), torch.full_like(x, 5.0))
    given = torch.rand(1, 1, 16, 16)
    assert torch.equal(make_baseline(x, given), given.expand_as(x))
    with pytest.raises(ValueError):
        make_baseline(x, "white")


def test_unknown_options_are_rejected():
    with pytest.raises(ValueError):
        quadrature("simpson", 10)
    with pytest.raises(TypeError):
        get_method("integrated_gradients", stepz=3)
    # options of other methods are ignored (one flat namespace), prefixed names are accepted
    m = get_method("integrated_gradients", ig_steps=3, seed=1, eps=1e-7, cam_target_layer="x")
    assert m.config["steps"] == 3
