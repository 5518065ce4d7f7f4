"""Grad-CAM (Selvaraju et al. 2017): ``alpha_k = mean_ij dy_c/dA_k,ij``;
``L = ReLU(sum_k alpha_k A_k)``; bilinear upsampling to the input size.

Default target: the rectified ``features.norm5`` map (closed form, no backward pass; see
``_cam.py``). All B images x K targets come from one forward.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from audit.saliency._cam import CamInputs, cam_inputs, gradcam_weights, upsample, weighted_cam
from audit.saliency.base import SaliencyMethod, SaliencyResult

__all__ = ["GradCAM"]


class GradCAM(SaliencyMethod):
    """Options: ``target_layer`` (module name, default ``"features.norm5"`` = the rectified map
    that is pooled), ``pre_relu`` (with ``features.norm5``: the BatchNorm output before the ReLU,
    general autograd path), ``closed_form`` (``"auto"`` | True | False; False forces autograd).
    Prefixed names (``cam_target_layer``...) are accepted by ``get_method``."""

    name: ClassVar[str] = "gradcam"
    prefix: ClassVar[str] = "cam_"
    options: ClassVar[dict[str, Any]] = {
        "target_layer": "features.norm5",
        "pre_relu": False,
        "closed_form": "auto",
    }

    def cam_inputs(self, model, x: torch.Tensor, targets: torch.Tensor) -> CamInputs:
        c = self.config
        return cam_inputs(model, x, targets, c["target_layer"], c["pre_relu"], c["closed_form"])

    def channel_weights(self, ci: CamInputs) -> torch.Tensor:
        return gradcam_weights(ci)

    def from_cam_inputs(self, ci: CamInputs) -> SaliencyResult:
        raw = weighted_cam(ci, self.channel_weights(ci)).float()
        return SaliencyResult(upsample(raw, ci.input_size), raw, {})

    def _explain(self, model, x: torch.Tensor, targets: torch.Tensor) -> SaliencyResult:
        return self.from_cam_inputs(self.cam_inputs(model, x, targets))
