"""The report page's template context: every section built from one run directory's data."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import pandas as pd

from audit.protocol import N_NEEDED_CAP, VERDICT_LEGEND
from audit.store.rundir import RunData, SavedMaps

from . import gallery as _gallery
from .format import DECIMALS, THRESHOLDS, as_text, fmt, method_labels, slugify
from .pathology import (
    box_names,
    boxes_for,
    load_reference_figures,
    methods_of,
    pathology_names,
    pathology_rows,
    pathology_section,
    reference_for,
    verdicts,
)
from .provenance import provenance, sub
from .sections import (
    FIDELITY_HEADERS,
    REPEAT_HEADERS,
    change_section,
    completeness_section,
    fidelity_section,
    randomization_section,
    rejects_section,
    repeatability_section,
)

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def rendered_at() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _threshold(data: RunData) -> str | None:
    """The binarization threshold the boxes were scored with (else the settings')."""
    boxes = data.boxes
    if boxes is not None and "threshold" in boxes and boxes["threshold"].notna().any():
        return fmt(boxes["threshold"].dropna().iloc[0], 2)
    settings = sub(data.run, "settings")
    return as_text(settings.get("threshold")) if "threshold" in settings else None


def build_context(data: RunData, previous_run_dir: Path | None = None,
                  comparison: pd.DataFrame | None = None, with_gallery: bool = True) -> dict:
    run = data.run
    prov = provenance(run)
    methods, kinds = methods_of(data)
    sections, aggregate = pathology_names(data)
    pp = data.per_pathology
    ref_all = load_reference_figures().get("chestxray8_localization_iobb", {})
    show_ref = prov["published"] and bool(ref_all)

    thumbs_dir = data.thumbs_dir if data.thumbs_dir.is_dir() else None
    maps = SavedMaps(data.maps_dir if data.maps_dir.is_dir() else None)
    sizes = _gallery.OriginalSizes(data.boxes)
    gallery = (thumbs_dir, maps, sizes) if with_gallery else None

    used: set[str] = set()
    headline = []
    pathologies = []
    for name in sections + aggregate:
        rows = pathology_rows(pp, name, methods) if pp is not None and "pathology" in pp else []
        b = boxes_for(data.boxes, name)
        model_finding, names = box_names(name, b)
        ref = reference_for(name, model_finding, ref_all) if show_ref else None
        headline.append({"name": name, "rows": rows, "reference": ref,
                         "has_section": name in sections})
        if name in sections:
            pathologies.append(pathology_section(data, name, slugify(name, used), rows, b,
                                                 names, ref, methods, kinds, gallery))
    maps.close()

    return {
        "csp": CSP,
        "title": f"Saliency audit — {prov['model_values']['name'] or 'model'} on "
                 f"{prov['dataset_values']['name'] or 'dataset'}",
        "prov": prov,
        # the run as it is named once finished (never a staging folder's name)
        "run_name": data.run_id,
        "rendered_at": rendered_at(),
        "decimals": DECIMALS,
        "thresholds": THRESHOLDS,
        "methods": methods,
        "kinds": kinds,
        "method_labels": method_labels(methods),
        "verdicts": verdicts(pp, methods),
        "verdict_legend": VERDICT_LEGEND,
        "n_needed_cap": N_NEEDED_CAP,
        "headline": headline,
        "has_per_pathology": pp is not None and not pp.empty,
        "pathologies": pathologies,
        "gallery_sizes_assumed": sizes.assumed,
        "repeatability": repeatability_section(data.images, methods),
        "repeat_headers": REPEAT_HEADERS,
        "fidelity_headers": FIDELITY_HEADERS,
        "randomization": randomization_section(data.curves, data.images, methods),
        "fidelity": fidelity_section(data.curves, data.images, methods),
        "completeness": completeness_section(data.images, methods),
        "rejects": rejects_section(data.rejects),
        "change": change_section(data, previous_run_dir, comparison, methods),
        "reference": ref_all if show_ref else None,
        "threshold": _threshold(data),
        "status_warning": as_text(run.get("status")) not in ("finished", ""),
        "has_boxes": data.boxes is not None and not data.boxes.empty,
    }
