"""Our Grad-CAM, Grad-CAM++ and IG against the reference implementations (pytorch-grad-cam,
MONAI, Captum) on the same random-init DenseNet-121, inputs and targets.

Every test runs under 1 and 2 intra-op threads (``torch_threads``).

Tolerances, and what each still catches:
- CAM maps (``TOL_CAM`` = 1e-5 of the map's range): both sides min-max normalize, so the bound is
  relative to the map's maximum. The maps are a sum of 1024 channel products in float32
  (rounding ~1e-7 relative per term, accumulated to ~1e-6 at worst); upsampling differs only in
  summation order (ours torch bilinear, align_corners=False; pytorch-grad-cam cv2.resize
  INTER_LINEAR; MONAI F.interpolate). It still catches a wrong weighting (mean vs sum of the
  gradients changes nothing after min-max, but GAP weights vs Grad-CAM++'s alpha weights differ
  by 1e-2..1e-1), a missing ReLU (negative half of the map) or the wrong layer (> 1e-2).
- IG (``TOL_IG_REL`` = 1e-6 of the reference map's maximum): the comparison runs in float64
  (model and inputs). In float32 the random-init network at inputs of +-1024 amplifies a
  rounding difference of the path points (1e-7 relative) to ~5e-3 of the map (measured: Captum
  against itself with 1e-4 of input noise), so two correct implementations that build the path
  points in another order disagree by up to 1.3e-2; in float64 the same amplification of 1e-16
  stays below 1e-10. The remaining error is the float32 cast of our maps (6e-8 relative). It
  still catches a wrong node (left vs middle: ~1e-2), a wrong end weight (trapezoid ends not
  halved: > 1e-3), a dropped (x - x') factor, or another baseline.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audit.model import load_model
from audit.saliency import explain_all, get_method
from audit.saliency._cam import cam_inputs, upsample, weighted_cam
from audit.saliency.integrated_gradients import make_baseline

xrv = pytest.importorskip("torchxrayvision")
TOL_CAM = 1e-5
TOL_IG_REL = 1e-6

pytestmark = pytest.mark.usefixtures("torch_threads")


def _calibrated(model):
    """Give the random-init network data-like BatchNorm statistics (cumulative running averages
    over a few seeded images), so logits are O(1-10) instead of O(100s) and nothing is
    degenerate (the bare init is bias-free and positively homogeneous)."""
    g = torch.Generator().manual_seed(11)
    imgs = torch.rand((6, 1, 96, 96), generator=g) * 2048 - 1024
    for mod in model.net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
    model.net.train()
    with torch.no_grad():
        model.net(imgs)
    model.net.eval()
    return model


@pytest.fixture(scope="module")
def model():
    return _calibrated(load_model(random_init=True, seed=0, device="cpu"))


@pytest.fixture(scope="module")
def xs():
    """Two 128x128 images (norm5 map 4x4; the 224 px / 7x7 case is in test_saliency_real.py)."""
    g = torch.Generator().manual_seed(1)
    return torch.rand((2, 1, SIZE, SIZE), generator=g) * 2048 - 1024


SIZE = 128
HW = (SIZE // 32) ** 2  # positions of the norm5 map
TARGETS = torch.tensor([[3, 7], [0, 10]])


def _minmax(a: torch.Tensor) -> torch.Tensor:
    a = a - a.amin(dim=(-2, -1), keepdim=True)
    return a / (1e-7 + a.amax(dim=(-2, -1), keepdim=True))


def _pytorch_grad_cam(cls, net, layer, x, targets) -> torch.Tensor:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    per_k = []
    for k in range(targets.shape[1]):
        with cls(net, [layer]) as cam:
            out = cam(x, [ClassifierOutputTarget(int(t)) for t in targets[:, k]])
        per_k.append(torch.from_numpy(np.asarray(out)))
    return torch.stack(per_k, dim=1)


def test_gradcam_and_gradcampp_equal_pytorch_grad_cam_at_the_rectified_norm5_map(model, xs):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus

    ours = explain_all(model, xs, TARGETS, ["gradcam", "gradcampp"])
    layer = model.net.relu5  # the map that is pooled: our default target "features.norm5"
    for name, cls in (("gradcam", GradCAM), ("gradcampp", GradCAMPlusPlus)):
        ref = _pytorch_grad_cam(cls, model.net, layer, xs, TARGETS)
        assert ours[name].maps.shape == ref.shape == (2, 2, SIZE, SIZE)
        diff = (_minmax(ours[name].maps) - ref).abs().max().item()
        assert diff <= TOL_CAM, (name, diff)


def test_gradcam_and_gradcampp_equal_pytorch_grad_cam_at_the_pre_relu_norm5_output(model, xs):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus

    ours = explain_all(model, xs, TARGETS, ["gradcam", "gradcampp"], pre_relu=True)
    for name, cls in (("gradcam", GradCAM), ("gradcampp", GradCAMPlusPlus)):
        ref = _pytorch_grad_cam(cls, model.net, model.net.features.norm5, xs, TARGETS)
        diff = (_minmax(ours[name].maps) - ref).abs().max().item()
        assert diff <= TOL_CAM, (name, diff)


def test_pytorch_grad_cam_on_the_stock_model_pairs_rectified_activations_with_pre_relu_gradients(
        model, xs):
    """On the stock xrv model, pytorch-grad-cam's norm5 hook stores ``output.cpu().detach()``
    (on CPU: the same storage), which xrv's in-place ReLU then rectifies, while its gradient hook
    receives the gradient w.r.t. the pre-ReLU output. Its map is that hybrid (on CUDA ``.cpu()``
    copies first, so it would be pre-ReLU activations instead): it matches neither clean
    definition, so we compare against the hook-safe model (tests above) and document it here."""
    from pytorch_grad_cam import GradCAM

    stock = xrv.models.DenseNet(weights=None).eval()
    stock.load_state_dict(model.net.state_dict())
    ref = _pytorch_grad_cam(GradCAM, stock, stock.features.norm5, xs, TARGETS)

    rect = cam_inputs(model, xs, TARGETS)                 # A = ReLU(norm5)
    pre = cam_inputs(model, xs, TARGETS, pre_relu=True)   # dy/d norm5 (masked by ReLU')
    hybrid = weighted_cam(rect, pre.grads.mean(dim=(-2, -1)))
    hybrid = upsample(hybrid, (SIZE, SIZE))
    # 1e-4: this map sums large terms of both signs (numpy vs torch summation order)
    assert (_minmax(hybrid) - ref).abs().max().item() <= 1e-4
    ours = get_method("gradcam").explain(model, xs, TARGETS).maps
    assert (_minmax(ours) - ref).abs().max().item() > 1e-2


def test_closed_form_equals_autograd_with_batched_backward(model, xs):
    closed = explain_all(model, xs, TARGETS, ["gradcam", "gradcampp"])
    auto = explain_all(model, xs, TARGETS, ["gradcam", "gradcampp"], target_layer="relu5")
    ci = cam_inputs(model, xs, TARGETS, target_layer="relu5")
    g = model.net.classifier.weight.detach()[TARGETS] / HW
    assert torch.allclose(ci.grads, g[..., None, None].expand_as(ci.grads), rtol=1e-6,
                          atol=1e-9)
    for name in closed:
        a, b = closed[name].raw, auto[name].raw
        assert a.shape == (2, 2, SIZE // 32, SIZE // 32)
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item(), name


def test_gradcam_at_norm5_is_cam_divided_by_the_map_size(model, xs):
    res = get_method("gradcam").explain(model, xs, TARGETS)
    with torch.no_grad():
        a = model.features(xs)
        w = model.net.classifier.weight[TARGETS]  # [B, K, C]
        cam = torch.einsum("bkc,bchw->bkhw", w, a)
    assert torch.allclose(res.raw, torch.relu(cam) / HW, rtol=1e-5, atol=1e-6)


def test_monai_gradcam_and_gradcampp_equal_ours_on_the_hook_safe_model(model, xs):
    from monai.visualize import GradCAM, GradCAMpp

    for name, cls, eps in (("gradcam", GradCAM, None), ("gradcampp", GradCAMpp, 1e-7)):
        opts = {} if eps is None else {"eps": eps}  # MONAI's guard is 1e-7
        for b in range(xs.shape[0]):
            xb = xs[b:b + 1]
            # MONAI multiplies by exp(logit): shift the bias so that exp() cannot overflow;
            # the gradients and activations (hence both maps) do not depend on the bias.
            m = model.copy()
            with torch.no_grad():
                m.net.classifier.bias -= m.logits(xb)[0]
            ours = get_method(name, **opts).explain(m, xb, TARGETS[b:b + 1]).maps[0]
            for k in range(TARGETS.shape[1]):
                cam = cls(m.net, "relu5", postprocessing=lambda a: a)
                ref = cam(xb, class_idx=int(TARGETS[b, k]))[0, 0]
                diff = (_minmax(ours[k]) - _minmax(ref)).abs().max().item()
                assert diff <= TOL_CAM, (name, b, k, diff)


def test_monai_raises_on_the_stock_xrv_model_and_the_hook_safe_forward_avoids_it(model):
    from monai.visualize import GradCAM

    x = torch.rand((1, 1, 64, 64)) * 2048 - 1024
    stock = xrv.models.DenseNet(weights=None).eval()
    with pytest.raises(RuntimeError, match="inplace"):
        GradCAM(stock, "features.norm5")(x, class_idx=3)
    safe = model.copy().net
    out = GradCAM(safe, "features.norm5")(x, class_idx=3)
    assert torch.isfinite(out).all()


def test_explain_all_runs_one_forward_for_gradcam_and_gradcampp(model, xs):
    calls = []
    h = model.net.features.conv0.register_forward_hook(lambda *a: calls.append(1))
    try:
        explain_all(model, xs, TARGETS, ["gradcam", "gradcampp"])
        assert len(calls) == 1
        calls.clear()
        explain_all(model, xs, TARGETS, ["gradcam", "gradcampp"], target_layer="relu5")
        assert len(calls) == 1
    finally:
        h.remove()


@pytest.fixture(scope="module")
def model64(model):
    """The same calibrated network in float64 (the reference comparison's precision)."""
    m = model.copy()
    m.net.double()
    return m


@pytest.mark.parametrize("method,baseline", [
    ("gausslegendre", "black"),
    ("riemann_trapezoid", "blurred"),
    ("riemann_left", "mean"),
    ("riemann_middle", "zeros"),
    ("riemann_right", "black"),
])
def test_integrated_gradients_equal_captum_in_float64(model64, method, baseline):
    from captum.attr import IntegratedGradients

    g = torch.Generator().manual_seed(2)
    x = (torch.rand((2, 1, 32, 32), generator=g) * 2048 - 1024).double()
    steps = 6
    ours = get_method("integrated_gradients", steps=steps, method=method, baseline=baseline,
                      blur_sigma=3.0, internal_batch_size=5).explain(model64, x, TARGETS)
    base = make_baseline(x, baseline, 3.0)
    ig = IntegratedGradients(model64.logits)
    for k in range(TARGETS.shape[1]):
        attr, delta = ig.attribute(x, baselines=base, target=TARGETS[:, k], n_steps=steps,
                                   method=method, return_convergence_delta=True)
        ref = attr.sum(dim=1)
        rel = (ours.maps[:, k].double() - ref).abs().max().item() / ref.abs().max().item()
        assert rel <= TOL_IG_REL, (k, rel)
        # the gap is |sum - delta_f|: its error is that of the float32 cast of both terms
        gap = ours.extras["completeness_gap"][:, k].double()
        scale = ours.extras["delta_f"][:, k].double().abs().max().item()
        assert torch.allclose(gap, delta.abs(), rtol=1e-5, atol=1e-6 * scale)


def test_integrated_gradients_in_float32_build_the_same_path_points_as_captum(model):
    """In float32 compare what float32 rounding touches, the path points themselves: the
    network's input at every step must be Captum's to within the rounding of x' + a (x - x')
    (a few ulp of 1024, ~5e-4). A wrong node (left vs middle) moves them by |x - x'| / 2n."""
    from captum.attr import IntegratedGradients

    g = torch.Generator().manual_seed(2)
    x = torch.rand((1, 1, 64, 64), generator=g) * 2048 - 1024
    seen: dict[str, list[torch.Tensor]] = {"ours": [], "captum": []}

    def recorder(key):
        def hook(_module, args):
            seen[key].append(args[0].detach().clone())
        return hook

    for key in seen:
        handle = model.net.features.conv0.register_forward_pre_hook(recorder(key))
        try:
            if key == "ours":
                get_method("integrated_gradients", steps=6, method="riemann_left",
                           baseline="mean", internal_batch_size=6).explain(model, x, TARGETS[:1])
            else:
                IntegratedGradients(model.logits).attribute(
                    x, baselines=make_baseline(x, "mean"), target=TARGETS[:1, 0], n_steps=6,
                    method="riemann_left", internal_batch_size=6)
        finally:
            handle.remove()
    ours = torch.cat(seen["ours"])[:6]
    theirs = torch.cat(seen["captum"])[:6]
    assert ours.shape == theirs.shape == (6, 1, 64, 64)
    assert (ours - theirs).abs().max().item() <= 4 * torch.finfo(torch.float32).eps * 1024


def test_gradcampp_epsilon_shapes_the_map_at_norm5_and_eps_zero_stays_finite(model, xs):
    """At norm5 the gradients are ~W/hw (g^2 ~ 1e-7), so pytorch-grad-cam's eps=1e-6 is not
    negligible; eps=0 (the paper's exact form) must stay finite on both paths."""
    default = get_method("gradcampp").explain(model, xs, TARGETS).maps
    exact = get_method("gradcampp", eps=0.0).explain(model, xs, TARGETS).maps
    pre = get_method("gradcampp", eps=0.0, pre_relu=True).explain(model, xs, TARGETS).maps
    assert torch.isfinite(exact).all() and torch.isfinite(pre).all()
    assert (_minmax(default) - _minmax(exact)).abs().max() > 1e-3
