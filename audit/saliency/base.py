"""The common interface of saliency methods: a result type, a small base class, input checks.

Every method is ``explain(model, x[B,1,H,W], targets[B] or [B,K]) -> SaliencyResult`` with
``maps[B,K,H,W]`` float32 at input resolution (not min-max normalized), ``raw[B,K,h,w]`` at the
method's native resolution and ``extras: dict[str, Tensor[B,K]]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from audit.model import ModelLike

__all__ = ["SaliencyResult", "SaliencyMethod", "as_target_matrix", "check_images"]


@dataclass
class SaliencyResult:
    """Maps for B images x K targets.

    ``maps``: ``[B, K, H, W]`` float32 at input resolution (CAM: ReLU'd and bilinearly upsampled;
    IG: signed, summed over channels; baselines: their prior). ``raw``: ``[B, K, h, w]`` at the
    native resolution (7x7 for CAM at norm5; = ``maps`` for IG and the baselines).
    ``extras``: per-map measurements ``[B, K]`` (IG: ``completeness_gap``, ``delta_f``, ...).
    """

    maps: torch.Tensor
    raw: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def detach_cpu(self) -> SaliencyResult:
        return SaliencyResult(self.maps.detach().cpu(), self.raw.detach().cpu(),
                              {k: v.detach().cpu() for k, v in self.extras.items()})


def as_target_matrix(targets: torch.Tensor | Any, batch: int, device: torch.device) -> torch.Tensor:
    """``targets`` ``[B]`` or ``[B, K]`` (tensor or nested list) -> LongTensor ``[B, K]``."""
    t = torch.as_tensor(targets, device=device)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"targets must be integer output indices, got {t.dtype}")
    t = t.long()
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2 or t.shape[0] != batch:
        raise ValueError(f"targets must be [B] or [B, K] with B={batch}, got {tuple(t.shape)}")
    return t


def check_images(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a tensor [B, C, H, W], got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    return x


class SaliencyMethod:
    """Base: subclasses set ``name`` / ``kind`` and implement ``_explain``.

    ``options`` (class attribute) maps an option name to its default; ``get_method`` accepts the
    bare name or the name with the method's ``prefix`` (``ig_steps`` for ``steps``).
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "method"  # "method" | "baseline"
    prefix: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}
    #: True when the maps are >= 0 by construction (CAM, baselines); IG is signed.
    non_negative: ClassVar[bool] = True

    def __init__(self, **options: Any):
        unknown = set(options) - set(self.options)
        if unknown:
            raise TypeError(f"{self.name}: unknown option(s) {sorted(unknown)}; "
                            f"known: {sorted(self.options)}")
        self.config: dict[str, Any] = {**self.options, **options}

    def explain(self, model: ModelLike, x: torch.Tensor, targets) -> SaliencyResult:
        x = check_images(x).to(model.device)
        t = as_target_matrix(targets, x.shape[0], x.device)
        return self._explain(model, x, t)

    def _explain(self, model: ModelLike, x: torch.Tensor, targets: torch.Tensor
                 ) -> SaliencyResult:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The effective options (for provenance)."""
        return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
                for k, v in self.config.items()}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({opts})"
