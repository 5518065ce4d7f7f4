"""The audit certificate: the report's first page, in plain words a reviewer can sign.

What was audited (model and weights sha256, dataset and manifest sha256, images, boxes, date),
how (methods, target layer, metrics, threshold, criteria), the verdicts (the summary's grid) and
the known limitations of this run's numbers. Everything is read from the run directory; nothing is
recomputed. The sha256 of the report itself cannot be inside the report: `print_pdf` writes it
into every printed page's footer (``REPORT_SHA_SLOT``), and ``cxr-audit verify`` checks
``report.html`` against ``run.json``.
"""

from __future__ import annotations

from typing import Any

from audit.protocol import NIH_FRAME_PX, POINTING_TOLERANCE_AT_1024, method_kind
from audit.store.rundir import RunData

from .format import as_text, method_label
from .pathology import DEFAULT_IMAGE_SIZE
from .pathology_context import CAM_METHODS, cam_grid
from .provenance import sub

#: A slot at the end of the printed footer's content, where `print_pdf` adds a second line with
#: the sha256 of the HTML file the PDF is printed from (a browser's own print leaves it out).
REPORT_SHA_SLOT = "/* report-sha256 */"

COSTLY_FAMILIES = {"repeatability": "repeatability", "randomization":
                   "randomization sensitivity", "fidelity": "fidelity (deletion / insertion)"}

CALIBRATION_SCOPE = (
    "Calibration (cxr-audit demo, synthetic phantoms): with Grad-CAM and Grad-CAM++ the "
    "instrument tells a lesion-reading model from a marker-reading one and a random one. It does "
    "not show that a PASS means clinically correct localization, nor cover Integrated Gradients "
    "or fidelity.")


def _join(words: list[str]) -> str:
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else "".join(words)


def _how(settings: dict[str, Any], methods: list[str], target_layer: str
         ) -> list[tuple[str, str]]:
    explained = [method_label(m) for m in methods if method_kind(m) == "method"]
    baselines = [method_label(m) for m in methods if method_kind(m) == "baseline"]
    metrics = [str(m) for m in settings.get("metrics") or []]
    rows = [("Saliency methods", _join(explained) or "none")]
    if baselines:
        rows.append(("Baseline maps (the bar a method must beat)", _join(baselines)))
    if any(m in CAM_METHODS for m in methods):
        rows.append(("CAM target layer", target_layer))
    ig = [f"{as_text(settings.get(key))} {word}" for key, word in (
        ("ig_steps", "steps"), ("ig_method", "rule"), ("ig_baseline", "baseline"))
        if as_text(settings.get(key))]
    if "integrated_gradients" in methods and ig:
        rows.append(("Integrated Gradients", ", ".join(ig)))
    rows.append(("Metrics", _join(metrics) or "none"))
    if "localization" in metrics:
        rows.append(("Localization", "IoU and IoBB of the box around the map binarized at "
                     + as_text(settings.get("threshold")) + " of its maximum; pointing game: "
                     f"the maximum within the box ± {POINTING_TOLERANCE_AT_1024:g} px at "
                     f"{NIH_FRAME_PX:g} px"))
    return rows


def costly_pairs(data: RunData) -> int:
    """The image–finding pairs the costly families were computed on: the run's recorded sample,
    else the pairs its curves hold."""
    recorded = sub(data.run, "sampled").get("costly_sample")
    if isinstance(recorded, list):
        return len(recorded)
    curves = data.curves
    if curves is not None and not curves.empty and {"image_key", "finding"} <= set(curves):
        return len(curves[["image_key", "finding"]].drop_duplicates())
    return 0


def _limitations(data: RunData, settings: dict[str, Any], methods: list[str],
                 n_rows: int) -> list[str]:
    run = data.run
    out = []
    if any(m in CAM_METHODS for m in methods):
        grid, cell = cam_grid(int(settings.get("image_size") or DEFAULT_IMAGE_SIZE))
        out.append(f"Resolution: Grad-CAM and Grad-CAM++ maps come from a {grid} × {grid} grid "
                   f"(about {cell:.0f} px per cell at {NIH_FRAME_PX:g} px): small "
                   "findings cannot reach a high IoU whatever the model does (each pathology's "
                   "section gives its ceiling).")
    costly = [COSTLY_FAMILIES[m] for m in settings.get("metrics") or [] if m in COSTLY_FAMILIES]
    pairs = costly_pairs(data)
    if costly and pairs:
        cap = as_text(settings.get("costly_per_pathology"))
        out.append(f"Samples: {_join(costly)} rest on a seeded sample of {pairs} image–finding "
                   f"pairs{f' (at most {cap} per pathology)' if cap else ''}, not on every box.")
    else:
        out.append("Samples: repeatability, randomization and fidelity were not computed (no "
                   "pair sampled); only localization is judged.")
    model = sub(run, "model")
    if as_text(model.get("source")) == "random-init":
        out.append("Model: randomly initialized (a negative control); its verdicts say nothing "
                   "about a trained model.")
    if n_rows:
        out.append(f"Statistics: each of the {n_rows} verdicts rests on its own 95% interval, "
                   "uncorrected for multiple comparisons: near a criterion, about 1 in 20 can "
                   "fall on the wrong side by chance.")
    out.append("Meaning: a map inside the box shows that the output depends on that region, "
               "not that the model recognized the finding.")
    out.append(CALIBRATION_SCOPE)
    return out


def certificate(data: RunData, prov: dict[str, Any], methods: list[str], n_verdicts: int
                ) -> dict[str, Any]:
    """The certificate's context: ``how`` (label, text) rows and ``limitations`` sentences."""
    settings = sub(data.run, "settings")
    return {"how": _how(settings, methods, prov["target_layer"]),
            "limitations": _limitations(data, settings, methods, n_verdicts),
            "sha_slot": REPORT_SHA_SLOT}
