"""The audit's shared vocabulary: every name, threshold and default that more than one module
uses lives here, and everything else imports it.

Method and baseline names are checked against the saliency registry (``audit.saliency``), metric
families against the settings (``audit.config``); the report, the run directory format and the
registry read the same names from here.
"""

from __future__ import annotations

from typing import Any

#: The saliency methods the audit scores, in report order.
METHOD_NAMES: tuple[str, ...] = ("gradcam", "gradcampp", "integrated_gradients")
#: Reference maps that use no model gradient, in report order.
BASELINE_NAMES: tuple[str, ...] = ("random", "centre_prior", "average_box")
#: Display names.
METHOD_LABELS: dict[str, str] = {
    "gradcam": "Grad-CAM",
    "gradcampp": "Grad-CAM++",
    "integrated_gradients": "Integrated Gradients",
    "random": "Random map",
    "centre_prior": "Centre prior",
    "average_box": "Average expert box",
}
#: Metric families; localization is always computed.
METRIC_FAMILIES: tuple[str, ...] = ("localization", "repeatability", "randomization", "fidelity")

#: Binarization threshold: fraction of the map's maximum (Grad-CAM paper protocol).
DEFAULT_THRESHOLD = 0.15
#: IoU / IoBB hit thresholds (ChestX-ray8 Table 4 style).
HIT_THRESHOLDS: tuple[float, ...] = (0.1, 0.25, 0.5)
#: The frame the NIH boxes are drawn in, and the pointing-game tolerance in that frame.
NIH_FRAME_PX = 1024.0
POINTING_TOLERANCE_AT_1024 = 15.0

#: NIH box-list names that differ from the model's output names.
NIH_TO_MODEL_FINDING: dict[str, str] = {"Infiltrate": "Infiltration"}

#: The CAM target layer (module name) and how run.json / the report describe it.
DEFAULT_TARGET_LAYER = "features.norm5"
TARGET_LAYER_TEXT = "features.norm5 (rectified: ReLU(norm5) as pooled)"

#: Where a model's weights came from (run.json ``model.source``, model provenance).
MODEL_SOURCES: tuple[str, ...] = ("weights", "checkpoint", "random-init")

#: The default acceptance criterion: pointing-game hit rate >= 0.5 for every pathology/method.
DEFAULT_CRITERIA: tuple[dict[str, Any], ...] = (
    {"pathology": "*", "method": "*", "metric": "pointing_rate", "op": ">=", "value": 0.5,
     "use": "estimate"},
)


def to_model_finding(nih_name: str) -> str:
    """The model's output name for an NIH finding name (``Infiltrate`` -> ``Infiltration``)."""
    return NIH_TO_MODEL_FINDING.get(nih_name, nih_name)


def method_kind(name: str) -> str:
    """``"baseline"`` for a baseline map, ``"method"`` otherwise."""
    return "baseline" if name in BASELINE_NAMES else "method"
