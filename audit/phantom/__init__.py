"""The digital chest phantom and its reference models.

- :mod:`audit.phantom.generate`: the phantom itself: ``generate_phantom(seed, index, config)``
  renders an image with planted findings, their boxes and labels (``PhantomConfig``,
  ``FINDINGS``, the shortcut marker's box ``marker_box``). numpy only.
- :mod:`audit.phantom.dataset`: phantom sets on disk: ``write_phantom_dataset`` (PNG, DICOM and
  NIH-format box and label CSVs).
- :mod:`audit.phantom.models`: what the demo and the audit need at runtime: the shipped weights
  (``WEIGHTS_DIR``, ``read_manifest``, ``load_phantom_weights`` with its sha256 check and
  ``WeightsMismatch``), ``load_phantom_model`` and ``make_net`` (the seeded random control).
- :mod:`audit.phantom.calibration`: does the audit tell the reference models apart (reads
  finished run directories).
- The maintainer's tools that made and measured the shipped weights:
  :mod:`audit.phantom.frontend` (the fixed front end and the live-channel head),
  :mod:`audit.phantom.training` (feature cache, head training, the recipe ``train``) and
  :mod:`audit.phantom.evaluation` (held-out metrics, ``ship_weights``).

Nothing is re-exported here: import from the module, so that generating phantoms never imports
torch. The demo's defaults live here (the CLI and the demo flow both read them).
"""

#: `cxr-audit demo`: phantom test images (one set for the three models), the phantom seed, the
#: findings' prevalence, the methods and metric families (integrated gradients costs minutes per
#: model on two CPU cores: not in the demo), and the sample of (image, finding) pairs that get the
#: costly metric families (at most ``DEMO_COSTLY_PER_PATHOLOGY`` per finding, ``DEMO_COSTLY_PAIRS``
#: in all: the randomization check averages that many maps). docs/phantom.md, "Calibration",
#: says why.
DEMO_IMAGES = 40
DEMO_SEED = 20261128
DEMO_PREVALENCE = 0.5  # of each finding in the demo's test set (~20 boxes per finding)
DEMO_METHODS = ("gradcam", "gradcampp")
DEMO_COSTLY_PER_PATHOLOGY = 2
DEMO_COSTLY_PAIRS = 5
#: Metric families: deletion/insertion fidelity is left out (12-20 s per image-finding and method
#: on two loaded cores, most of a run's time); `cxr-audit run` computes it.
DEMO_METRICS = ("localization", "repeatability", "randomization")
#: The demo's acceptance criteria (judged by CI, see docs/metrics.md "Verdicts").
DEMO_CRITERIA: tuple[dict, ...] = (
    {"pathology": "*", "method": "*", "metric": "pointing_rate", "op": ">=", "value": 0.5,
     "use": "ci"},
    {"pathology": "*", "method": "*", "metric": "pointing_hit", "op": "beats",
     "baseline": "centre_prior"},
    {"pathology": "*", "method": "*", "metric": "iou", "op": "beats",
     "baseline": "centre_prior"},
    {"pathology": "*", "method": "*", "metric": "iou", "op": "beats",
     "baseline": "average_box"},
)
