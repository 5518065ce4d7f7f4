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
#: Integrated Gradients' quadrature rules: Captum's names (same nodes and weights) plus the exact
#: composite ``trapezoid`` (``audit.saliency.integrated_gradients.quadrature``).
QUADRATURE_RULES: tuple[str, ...] = ("riemann_left", "riemann_right", "riemann_middle",
                                     "riemann_trapezoid", "gausslegendre", "trapezoid")
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

# ---- acceptance criteria and verdicts (docs/metrics.md "Acceptance criteria") ----------------

#: The three verdicts of a criterion (and of a pathology x method row, and of a run).
PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"
VERDICTS: tuple[str, ...] = (PASS, FAIL, INCONCLUSIVE)
#: One sentence each, shown as the report's legend.
VERDICT_LEGEND: dict[str, str] = {
    PASS: "The whole 95% confidence interval lies on the passing side of the criterion, so these "
          "boxes show that it is met.",
    FAIL: "The whole 95% confidence interval lies on the failing side of the criterion (for "
          "“beats a baseline”: the paired difference's interval lies at or below 0), so these "
          "boxes show that it is not met.",
    INCONCLUSIVE: "The 95% confidence interval straddles the criterion, so these boxes cannot "
                  "tell either way; “n needed” is the number of boxes that would decide it if "
                  "the observed rate held.",
}
#: How a criterion reads its metric: ``ci`` judges the whole 95% CI (three verdicts); ``estimate``
#: judges the point estimate alone (PASS/FAIL only), and is labelled "point estimate".
CRITERION_USES: dict[str, str] = {"ci": "95% CI", "estimate": "point estimate"}
DEFAULT_CRITERION_USE = "ci"
#: Comparison operators of a criterion on a per_pathology metric (``==``/``!=``: estimate only).
CRITERION_OPS: tuple[str, ...] = (">=", ">", "<=", "<", "==", "!=")
#: The operator of a baseline criterion: the method beats ``baseline`` on the same boxes (paired
#: difference method - baseline, its 95% CI above 0).
BEATS = "beats"
#: per_pathology metrics a criterion may name: rates with Wilson CIs, means/medians with
#: bootstrap CIs, and means without a CI (``use = "estimate"`` only).
RATE_METRICS: tuple[str, ...] = ("pointing_rate", *(
    f"{family}_hit_{t:g}_rate" for family in ("iou", "iobb") for t in HIT_THRESHOLDS))
BOOTSTRAP_METRICS: tuple[str, ...] = ("iou_mean", "iou_median")
ESTIMATE_ONLY_METRICS: tuple[str, ...] = ("iobb_mean", "coverage_mean")
#: Per-box metrics that a baseline criterion compares (paired.csv ``metric``).
PAIRED_METRICS: tuple[str, ...] = ("iou", "iobb", "coverage", "pointing_hit")
#: The search for "n needed" (the boxes that would make an inconclusive verdict decisive at the
#: observed rate) stops here; beyond it the report says "never".
N_NEEDED_CAP = 100_000

#: The default acceptance criteria, for every pathology and method: the pointing-game hit rate is
#: at least 0.5 by its 95% CI, and the method beats the centre prior and the average expert box
#: on the pointing game, on the same boxes (paired difference, 95% CI).
DEFAULT_CRITERIA: tuple[dict[str, Any], ...] = (
    {"pathology": "*", "method": "*", "metric": "pointing_rate", "op": ">=", "value": 0.5,
     "use": "ci"},
    {"pathology": "*", "method": "*", "metric": "pointing_hit", "op": BEATS,
     "baseline": "centre_prior"},
    {"pathology": "*", "method": "*", "metric": "pointing_hit", "op": BEATS,
     "baseline": "average_box"},
)


def to_model_finding(nih_name: str) -> str:
    """The model's output name for an NIH finding name (``Infiltrate`` -> ``Infiltration``)."""
    return NIH_TO_MODEL_FINDING.get(nih_name, nih_name)


def method_kind(name: str) -> str:
    """``"baseline"`` for a baseline map, ``"method"`` otherwise."""
    return "baseline" if name in BASELINE_NAMES else "method"
