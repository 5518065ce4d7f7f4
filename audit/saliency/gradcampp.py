"""Grad-CAM++ (Chattopadhyay et al. 2018) in the exp-logit closed form used by the paper (eq. 19)
and by pytorch-grad-cam: ``a_ij = g^2 / (2 g^2 + sum_ab(A_ab) g^3 + eps)`` (0 where ``g == 0``),
``w_k = sum_ij a_ij ReLU(g_ij)``, ``L = ReLU(sum_k w_k A_k)``.

``eps`` defaults to pytorch-grad-cam's 1e-6 (MONAI: 1e-7). Shares the forward of Grad-CAM.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from audit.saliency._cam import GRADCAMPP_EPS, CamInputs, gradcampp_weights
from audit.saliency.gradcam import GradCAM

__all__ = ["GradCAMPlusPlus"]


class GradCAMPlusPlus(GradCAM):
    """Options: those of :class:`GradCAM` plus ``eps`` (denominator guard, default 1e-6)."""

    name: ClassVar[str] = "gradcampp"
    options: ClassVar[dict[str, Any]] = {**GradCAM.options, "eps": GRADCAMPP_EPS}

    def channel_weights(self, ci: CamInputs) -> torch.Tensor:
        return gradcampp_weights(ci, float(self.config["eps"]))
