"""Shared CAM machinery: activations and gradients for all targets of a batch at once.

Target layer
------------
``"features.norm5"`` (the default, ``AuditModel.target_layer_name``) denotes the norm5 feature map
*as the classifier pools it*: ``A = ReLU(norm5(...))``, ``[B, 1024, 7, 7]`` at 224 px. (On the
stock torchxrayvision model that is literally what the norm5 output tensor holds by the time it is
pooled: its ReLU is in place.) Because ``logit_c = W_c · mean_ij A_:ij + b_c``, the gradient of a
logit with respect to ``A`` is the constant ``W_c / (h·w)`` at every position: no backward pass is
needed (**closed form**). Consequence: Grad-CAM at this layer equals ``ReLU(CAM) / (h·w)`` (Zhou et
al.'s CAM).

Any other module name of ``model.net`` (or ``"features.norm5"`` with ``pre_relu=True``, the raw
BatchNorm output before the ReLU, whose gradient is ``W_c/(h·w)`` masked by ReLU') takes the
**general path**: one forward with a hook, then one vectorized backward for the K targets
(``torch.autograd.grad(..., is_grads_batched=True)``). The hook keeps the module's output for the
gradient and hands a clone downstream, so an in-place op after the layer cannot alter what was
captured. ``"relu5"`` is the rectified map again through autograd (used to verify the closed form).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "CamInputs",
    "cam_inputs",
    "closed_form_applies",
    "closed_form_inputs",
    "logits_from_features",
    "gradcam_weights",
    "gradcampp_weights",
    "weighted_cam",
    "upsample",
    "GRADCAMPP_EPS",
]

#: pytorch-grad-cam's epsilon in the Grad-CAM++ denominator (MONAI uses 1e-7). At norm5 the
#: gradients are W/49 ~ 3e-4, so g^2 ~ 1e-7 < eps: the epsilon is *not* negligible, it shapes
#: the weights (measured: up to 0.09 of the min-max-normalized map vs eps=0). It is kept for
#: equality with pytorch-grad-cam; ``eps=0`` gives the paper's exact closed form.
GRADCAMPP_EPS = 1e-6


@dataclass
class CamInputs:
    """Activations ``A [B, C, h, w]`` and the gradient of each target logit with respect to them:
    either spatially constant ``grad_const [B, K, C]`` (closed form) or ``grads [B, K, C, h, w]``.
    """

    activations: torch.Tensor
    input_size: tuple[int, int]
    grad_const: torch.Tensor | None = None
    grads: torch.Tensor | None = None
    closed_form: bool = False

    @property
    def spatial(self) -> int:
        return int(self.activations.shape[-2] * self.activations.shape[-1])


def closed_form_applies(model, target_layer: str, pre_relu: bool) -> bool:
    net = model.net
    return (target_layer == "features.norm5" and not pre_relu
            and hasattr(net, "rectified_features") and hasattr(net, "classifier"))


def _resolve_module(net: torch.nn.Module, target_layer: str, pre_relu: bool) -> torch.nn.Module:
    name = target_layer
    if target_layer == "features.norm5" and not pre_relu:
        name = "relu5"
    modules = dict(net.named_modules())
    if name not in modules:
        raise ValueError(f"target layer {target_layer!r} is not a module of the network "
                         f"(e.g. 'features.norm5', 'relu5', 'features.denseblock4')")
    return modules[name]


def cam_inputs(model, x: torch.Tensor, targets: torch.Tensor,
               target_layer: str = "features.norm5", pre_relu: bool = False,
               closed_form: bool | str = "auto") -> CamInputs:
    """One forward (and, on the general path, one batched backward) for all ``targets [B, K]``."""
    size = (int(x.shape[-2]), int(x.shape[-1]))
    if closed_form == "auto":
        closed_form = closed_form_applies(model, target_layer, pre_relu)
    elif closed_form and not closed_form_applies(model, target_layer, pre_relu):
        raise ValueError("the closed form applies only to the rectified 'features.norm5' map "
                         "(pre_relu=False) of a hook-safe DenseNet")
    if closed_form:
        with torch.inference_mode():
            acts = model.features(x)
        return closed_form_inputs(model, acts, targets, size)

    module = _resolve_module(model.net, target_layer, pre_relu)
    captured: dict[str, torch.Tensor] = {}

    def hook(_mod, _inp, out):
        captured["a"] = out
        return out.clone()  # downstream in-place ops touch the clone, never the captured tensor

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            xi = x.detach().requires_grad_(True)  # guarantees a graph even with frozen weights
            logits = model.logits(xi)
    finally:
        handle.remove()
    if "a" not in captured:
        raise RuntimeError(f"target layer {target_layer!r} was not run by the forward pass")
    acts = captured["a"]
    b, k = targets.shape
    onehot = torch.zeros((k, b, logits.shape[1]), dtype=logits.dtype, device=logits.device)
    onehot.scatter_(2, targets.t().unsqueeze(-1), 1.0)
    if k == 1:
        grads = torch.autograd.grad(logits, acts, onehot[0])[0].unsqueeze(0)
    else:
        grads = torch.autograd.grad(logits, acts, onehot, is_grads_batched=True)[0]
    return CamInputs(acts.detach().clone(), size, grads=grads.transpose(0, 1).detach(),
                     closed_form=False)


def closed_form_inputs(model, acts: torch.Tensor, targets: torch.Tensor,
                       input_size: tuple[int, int]) -> CamInputs:
    """The closed-form `CamInputs` of activations ``acts`` (``model.features(x)``) already
    computed: the gradient of logit ``c`` is ``W_c / (h·w)`` at every position."""
    with torch.inference_mode():
        w = model.net.classifier.weight
        h, wd = acts.shape[-2:]
        g = w[targets] / float(h * wd)  # [B, K, C]
    return CamInputs(acts.clone(), input_size, grad_const=g.clone(), closed_form=True)


def logits_from_features(model, acts: torch.Tensor) -> torch.Tensor:
    """The logits ``[B, P]`` from ``model.features(x)``: the same pooling and classifier ops, in
    the same order, as ``model.logits(x)`` (so the same numbers, without a second forward)."""
    with torch.inference_mode():
        pooled = F.adaptive_avg_pool2d(acts, (1, 1)).view(acts.size(0), -1)
        return model.net.classifier(pooled)


def gradcam_weights(ci: CamInputs) -> torch.Tensor:
    """Grad-CAM channel weights ``alpha [B, K, C] = mean_ij dy/dA``."""
    if ci.grad_const is not None:
        return ci.grad_const
    return ci.grads.mean(dim=(-2, -1))


def gradcampp_weights(ci: CamInputs, eps: float = GRADCAMPP_EPS) -> torch.Tensor:
    """Grad-CAM++ channel weights ``[B, K, C]`` (Chattopadhyay et al. 2018, eq. 19, exp-logit
    closed form, as in pytorch-grad-cam): ``a_ij = g^2 / (2 g^2 + sum_ab(A_ab) g^3 + eps)``,
    ``a_ij = 0`` where ``g == 0``, ``w = sum_ij a_ij ReLU(g_ij)``. The paper's ``exp(logit)``
    factor on ``w`` is a positive per-map scale and is omitted (as pytorch-grad-cam does)."""
    s = ci.activations.sum(dim=(-2, -1)).unsqueeze(1)  # [B, 1, C]
    if ci.grad_const is not None:
        return float(ci.spatial) * _alpha_relu_g(ci.grad_const, s, eps)
    return _alpha_relu_g(ci.grads, s[..., None, None], eps).sum(dim=(-2, -1))


def _alpha_relu_g(g: torch.Tensor, s: torch.Tensor, eps: float) -> torch.Tensor:
    """``a * ReLU(g)`` with ``a = g^2 / (2 g^2 + s g^3 + eps)``; 0 where ``g <= 0`` or where the
    denominator vanishes (possible only with ``eps = 0``), never inf/nan."""
    g2 = g * g
    den = 2 * g2 + s * (g2 * g) + eps
    safe = torch.where(den != 0, den, torch.ones_like(den))
    return torch.where((g > 0) & (den != 0), g2 * g / safe, torch.zeros_like(g))


def weighted_cam(ci: CamInputs, weights: torch.Tensor) -> torch.Tensor:
    """``ReLU(sum_c w[b,k,c] A[b,c])``: raw maps ``[B, K, h, w]``."""
    return F.relu(torch.einsum("bkc,bchw->bkhw", weights, ci.activations))


def upsample(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, ``align_corners=False`` (half-pixel centres, as cv2.resize INTER_LINEAR, which
    pytorch-grad-cam uses, and MONAI's default upsampler)."""
    if tuple(raw.shape[-2:]) == tuple(size):
        return raw.clone()
    return F.interpolate(raw, size=size, mode="bilinear", align_corners=False)
