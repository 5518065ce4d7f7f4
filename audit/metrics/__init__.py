"""Metrics of the audit: pure functions over numpy arrays (maps ``[H, W]``, boxes ``[N, 4]`` in the
map's frame), each with a batched wrapper. Definitions, ties and edge cases: docs/metrics.md.

Modules: ``localization`` (largest-component box, IoU, IoBB, coverage), ``pointing`` (pointing
game), ``similarity`` (SSIM, Spearman, HOG), ``repeatability`` (determinism, test-retest,
replicates), ``randomization`` (Adebayo sanity checks; imports torch), ``fidelity``
(deletion/insertion; imports torch), ``aggregation`` (CIs, paired comparisons), ``criteria``
(acceptance criteria, three-valued verdicts), ``sampling``.
The torch-based modules are not imported here, so ``import audit.metrics`` stays light.
"""

from audit.metrics.aggregation import (
    aggregate_per_pathology,
    bootstrap_ci,
    collapse_boxes,
    paired_difference,
    paired_run_difference,
    wilson_interval,
)
from audit.metrics.criteria import evaluate_criteria, overall_verdict
from audit.metrics.localization import (
    DEFAULT_THRESHOLD,
    HIT_THRESHOLDS,
    SWEEP_THRESHOLDS,
    LocalizationResult,
    box_coverage,
    box_iobb,
    box_iou,
    largest_component_box,
    localization_scores,
    localization_sweep,
    localization_table,
    localize,
    map_status,
    scores_against_boxes,
)
from audit.metrics.pointing import (
    pointing_game_distance,
    pointing_game_hit,
    pointing_table,
    pointing_tolerance_px,
)
from audit.metrics.repeatability import (
    determinism_max_abs_diff,
    gaussian_noise_perturbation,
    replicate_ssim,
    shift_image_and_boxes,
    test_retest_scores,
)
from audit.metrics.sampling import stratified_sample
from audit.metrics.similarity import hog_similarity, spearman, ssim

__all__ = [
    "DEFAULT_THRESHOLD",
    "HIT_THRESHOLDS",
    "SWEEP_THRESHOLDS",
    "LocalizationResult",
    "aggregate_per_pathology",
    "bootstrap_ci",
    "box_coverage",
    "box_iobb",
    "box_iou",
    "collapse_boxes",
    "determinism_max_abs_diff",
    "evaluate_criteria",
    "gaussian_noise_perturbation",
    "hog_similarity",
    "largest_component_box",
    "localization_sweep",
    "localization_table",
    "localization_scores",
    "localize",
    "scores_against_boxes",
    "map_status",
    "overall_verdict",
    "paired_difference",
    "paired_run_difference",
    "pointing_game_distance",
    "pointing_game_hit",
    "pointing_table",
    "pointing_tolerance_px",
    "replicate_ssim",
    "shift_image_and_boxes",
    "spearman",
    "ssim",
    "stratified_sample",
    "test_retest_scores",
    "wilson_interval",
]
