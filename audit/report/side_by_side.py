"""One HTML page comparing several runs (e.g. honest / shortcut / random-init models)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from audit.protocol import N_NEEDED_CAP, VERDICT_LEGEND
from audit.store.rundir import RunData, read_run

from .context import CSP, rendered_at
from .format import DECIMALS, generic_table, method_label, order_methods, slugify
from .html import environment, resolve_output, write_text
from .pathology import (
    average_map_panel,
    boxes_for,
    methods_of,
    pathology_names,
    table_row,
    verdicts,
)
from .provenance import provenance


def report_link(run_dir: Path, page_dir: Path) -> str | None:
    """The run's report.html relative to the page's folder (None when it was not rendered)."""
    report = run_dir / "report.html"
    if not report.is_file():
        return None
    return Path(os.path.relpath(report.resolve(), page_dir.resolve())).as_posix()


def _record(data: RunData, name: str, method: str) -> dict | None:
    """The per_pathology row of (pathology, method) in one run."""
    pp = data.per_pathology
    if pp is None or pp.empty:
        return None
    rows = pp[(pp["pathology"].astype(str) == name) & (pp["method"].astype(str) == method)]
    return rows.to_dict("records")[0] if len(rows) else None


def _pathology(name: str, runs: list[dict], methods: list[str], used: set[str]) -> dict:
    """Each run's table row per method, and each run's average-map panel."""
    rows = []
    for m in methods:
        recs = [_record(r["data"], name, m) for r in runs]
        cells = [table_row(rec) if rec is not None else None for rec in recs]
        if any(c is not None for c in cells):
            rows.append({"method": m, "label": method_label(m), "cells": cells})
    panels = []
    for r in runs:
        b = boxes_for(r["data"].boxes, name)
        alias = [str(x) for x in b["model_finding"].unique()] if b is not None else []
        panels.append({"label": r["label"], **average_map_panel(
            r["data"].average_maps, [name, *alias], methods)})
    return {"name": name, "slug": slugify(name, used), "rows": rows, "panels": panels}


def render_side_by_side(
    run_dirs: list[Path],
    out_html: Path,
    calibration: pd.DataFrame | None = None,
    labels: list[str] | None = None,
) -> Path:
    """One HTML page comparing several runs (e.g. honest / shortcut / random-init models).

    Per pathology and method: each run's pointing hit rate and mean IoU with 95% CIs and its
    verdict; the ``calibration`` table as given; the average-map panels of every run.
    """
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("render_side_by_side needs at least one run directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError("labels must have one entry per run directory")
    target, inside = resolve_output(run_dirs, Path(out_html))
    runs = []
    all_methods: list[str] = []
    all_names: list[str] = []
    all_kinds: dict[str, str] = {}
    for i, d in enumerate(map(read_run, run_dirs)):
        prov = provenance(d.run)
        methods, kinds = methods_of(d)
        all_methods += methods
        all_names += pathology_names(d)[0]
        for k, v in kinds.items():
            all_kinds.setdefault(k, v)
        label = labels[i] if labels is not None else (prov["model_values"]["name"] or d.run_id)
        runs.append({"label": label, "prov": prov, "verdicts": verdicts(d.per_pathology),
                     "data": d, "methods": methods,
                     "report": report_link(run_dirs[i], target.parent)})
    methods = order_methods(all_methods, all_kinds)
    used: set[str] = set()
    pathologies = [_pathology(name, runs, methods, used) for name in dict.fromkeys(all_names)]
    ctx = {
        "csp": CSP,
        "title": "Saliency audit — runs side by side",
        "runs": [{k: v for k, v in r.items() if k != "data"} for r in runs],
        "methods": methods,
        "pathologies": pathologies,
        "calibration": generic_table(calibration) if calibration is not None else None,
        "rendered_at": rendered_at(),
        "decimals": DECIMALS,
        "verdict_legend": VERDICT_LEGEND,
        "n_needed_cap": N_NEEDED_CAP,
    }
    write_text(target, environment().get_template("side_by_side.html.j2").render(**ctx),
               exclusive=inside)
    return target
