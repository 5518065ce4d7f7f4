"""The report page's template context: every section built from one run directory's data."""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path

import pandas as pd

from audit.protocol import DEFAULT_CRITERIA, N_NEEDED_CAP, VERDICT_LEGEND
from audit.store.gallery_maps import GalleryMaps
from audit.store.rundir import RunData, SavedMaps

from . import gallery as _gallery
from .certificate import certificate
from .format import (
    DECIMALS,
    ILLUSTRATIVE_BELOW,
    MIN_PAIRS_FOR_P,
    THRESHOLDS,
    as_text,
    fmt,
    method_labels,
    slugify,
    timestamp,
)
from .overlay import css_gradient
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
    """Now, to the second, with its zone (UTC)."""
    return timestamp(_dt.datetime.now(_dt.timezone.utc).isoformat())


def _threshold(data: RunData) -> str | None:
    """The binarization threshold the boxes were scored with (else the settings')."""
    boxes = data.boxes
    if boxes is not None and "threshold" in boxes and boxes["threshold"].notna().any():
        return fmt(boxes["threshold"].dropna().iloc[0], 2)
    settings = sub(data.run, "settings")
    return as_text(settings.get("threshold")) if "threshold" in settings else None


def criteria_metrics(run: dict) -> list[str]:
    """The metrics the run's acceptance criteria read (the default criteria's when none)."""
    crit = run.get("acceptance_criteria")
    crit = crit if isinstance(crit, list) and crit else list(DEFAULT_CRITERIA)
    return list(dict.fromkeys(str(c.get("metric")) for c in crit if isinstance(c, dict)))


def footer(run_id: str) -> dict[str, str]:
    """The printed page's left footer box (a CSS string, so only ``[A-Za-z0-9._:+-]`` and spaces
    survive): the run id; page x of y is on the right, the centre box is the report's sha256
    (`certificate.REPORT_SHA_SLOT`)."""
    return {"left": css_text(f"cxr-audit report · run {run_id}")}


def css_text(text: str) -> str:
    """``text`` safe inside a CSS string: anything but letters, digits, ``._:+-·`` and spaces
    becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9._:+\- ·]", "_", text)


def not_computed(sections: dict, pathologies: list[dict], methods: list[str],
                 has_per_pathology: bool) -> list[str]:
    """One line per section or pathology part this run did not compute (the page shows the
    list instead of empty sections)."""
    out = []
    if not has_per_pathology:
        out.append("Per-pathology table")
    for key, text in (("repeatability", "Repeatability"), ("randomization",
                      "Randomization sensitivity"), ("fidelity", "Fidelity: deletion and "
                      "insertion")):
        if not sections[key]:
            out.append(text)
    if "integrated_gradients" in methods and not sections["completeness"]:
        out.append("Integrated Gradients completeness")
    if sections["rejects"] is None:
        out.append("Rejected inputs (no rejects table recorded)")
    if sections["change"] is None:
        out.append("Change since the previous run (no previous run was given)")
    for p in pathologies:
        parts = [name for name, present in (
            ("per-box scores", p["distribution_plot"]),
            ("average maps", p["average"]["expert"] or p["average"]["tiles"]),
            ("gallery", p["gallery"])) if not present]
        if parts:
            out.append(f"{p['name']}: " + ", ".join(parts))
    return out


def build_context(data: RunData, previous_run_dir: Path | None = None,
                  comparison: pd.DataFrame | None = None, with_gallery: bool = True) -> dict:
    run = data.run
    prov = provenance(run)
    methods, kinds = methods_of(data)
    sections, aggregate = pathology_names(data)
    pp = data.per_pathology
    ref_all = load_reference_figures().get("chestxray8_localization_iobb", {})
    show_ref = prov["published"] and bool(ref_all)

    maps = _gallery.MapSource(GalleryMaps(data.gallery_maps_path),
                              SavedMaps(data.maps_dir if data.maps_dir.is_dir() else None))
    sizes = _gallery.OriginalSizes(data.boxes)
    gallery = {"thumbs_dir": data.thumbs_dir if data.thumbs_dir.is_dir() else None,
               "maps": maps, "sizes": sizes,
               "completeness": _gallery.completeness_lookup(data.images)} \
        if with_gallery else None

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

    sections_ctx = {
        "repeatability": repeatability_section(data.images, methods),
        "randomization": randomization_section(data.curves, data.images, methods),
        "fidelity": fidelity_section(data.curves, data.images, methods),
        "completeness": completeness_section(data.images, methods),
        "rejects": rejects_section(data.rejects),
        "change": change_section(data, previous_run_dir, comparison, methods),
    }
    judged = verdicts(pp, methods)
    return {
        **sections_ctx,
        "certificate": certificate(data, prov, methods, judged["n"]),
        "not_computed": not_computed(sections_ctx, pathologies, methods, bool(pp is not None
                                                                               and not pp.empty)),
        "colour_gradient": css_gradient(),
        "illustrative_below": ILLUSTRATIVE_BELOW,
        "min_pairs_for_p": MIN_PAIRS_FOR_P,
        "verdict_metrics": criteria_metrics(run),
        "completeness_flag": _gallery.COMPLETENESS_FLAG,
        "footer": footer(data.run_id),
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
        "verdicts": judged,
        "verdict_legend": VERDICT_LEGEND,
        "n_needed_cap": N_NEEDED_CAP,
        "headline": headline,
        "has_per_pathology": pp is not None and not pp.empty,
        "pathologies": pathologies,
        "gallery_sizes_assumed": sizes.assumed,
        "repeat_headers": REPEAT_HEADERS,
        "fidelity_headers": FIDELITY_HEADERS,
        "reference": ref_all if show_ref else None,
        "threshold": _threshold(data),
        "status_warning": as_text(run.get("status")) not in ("finished", ""),
        "has_boxes": data.boxes is not None and not data.boxes.empty,
    }
