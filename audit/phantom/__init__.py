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

#: `cxr-audit demo`: phantom test images per set, the phantom seed, IG steps.
DEMO_IMAGES = 20
DEMO_SEED = 20261128
DEMO_IG_STEPS = 6
