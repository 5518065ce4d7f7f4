"""The short Markdown summary of a run (``summary.md`` beside the report, a Prefect artifact)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from audit.protocol import FAIL, VERDICT_LEGEND
from audit.store.files import float_or_nan
from audit.store.rundir import RunData, read_run

from .format import as_text, fmt, method_label, num_cell
from .pathology import methods_of, table_row, verdicts
from .provenance import provenance


def _md(text: Any) -> str:
    s = as_text(text).replace("\r", " ").replace("\n", " ")
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for ch in ("\\", "|", "`", "*", "_", "[", "]"):
        s = s.replace(ch, "\\" + ch)
    return s


def _ci_text(v, lo, hi) -> str:
    if not math.isfinite(float_or_nan(v)):
        return "–"
    return f"{fmt(v)} [{fmt(lo)}, {fmt(hi)}]"


def markdown_summary(data: RunData) -> str:
    prov = provenance(data.run)
    v = verdicts(data.per_pathology)
    mv, dv, rv = prov["model_values"], prov["dataset_values"], prov["run_values"]
    lines = [
        f"# Saliency audit: {_md(mv['name'])} on {_md(dv['name'])}",
        "",
        f"- Run: `{_md(data.run_id)}` finished {_md(rv['finished_at'])} on "
        f"{_md(rv['device'])}",
        f"- Model: {_md(mv['name'])} ({_md(mv['source'])}), weights sha256 "
        f"`{_md(mv['fingerprint'][:16])}…`",
        f"- Dataset: {_md(dv['name'])}, {_md(dv['n_images'])} images, {_md(dv['n_boxes'])} "
        f"boxes, manifest sha256 `{_md(dv['manifest_sha256'][:16])}…`",
        f"- Acceptance: **{v['overall']}** ({v['n_pass']} pass, {v['n_fail']} fail, "
        f"{v['n_inconclusive']} inconclusive of {v['n']} pathology × method rows)",
        "",
    ]
    pp = data.per_pathology
    if pp is not None and not pp.empty:
        methods, _ = methods_of(data)
        order = {m: i for i, m in enumerate(methods)}
        pathologies = list(dict.fromkeys(pp["pathology"].astype(str)))
        lines += ["| Pathology | Method | n | Mean IoU [95% CI] | Pointing hit rate [95% CI] "
                  "| Verdict |", "|---|---|---:|---|---|---|"]
        recs = sorted(pp.to_dict("records"), key=lambda r: (
            pathologies.index(str(r["pathology"])), order.get(str(r["method"]), 99)))
        for r in recs:
            lines.append(
                f"| {_md(r.get('pathology'))} | {_md(method_label(str(r.get('method'))))} | "
                f"{_md(num_cell(r.get('n'), integer=True)['text'])} | "
                f"{_ci_text(r.get('iou_mean'), r.get('iou_mean_lo'), r.get('iou_mean_hi'))} | "
                f"{_ci_text(r.get('pointing_rate'), r.get('pointing_lo'), r.get('pointing_hi'))}"
                f" | {_verdict_text(r)} |")
    else:
        lines.append("No per-pathology table in this run.")
    fails = [r for r in v["rows"] if r["verdict"] == FAIL]
    if fails:
        lines += ["", "Failed criteria:"]
        lines += [f"- {_md(r['pathology'])} / {_md(r['label'])}: {_md(_failed_parts(r))}"
                  for r in fails]
    if v["rows"]:
        lines += ["", "Verdicts: " + " ".join(f"**{k}**: {_md(t)}" for k, t in
                                              VERDICT_LEGEND.items())]
    return "\n".join(lines) + "\n"


def _failed_parts(r: dict) -> str:
    """The criteria of a FAIL row that failed (each criterion's text ends with its verdict)."""
    parts = r["criteria"].split("; ")
    return "; ".join(p for p in parts if f"→ {FAIL}" in p) or r["criteria"]


def _verdict_text(r: dict) -> str:
    """``INCONCLUSIVE (n = 70, n needed 123)``, ``PASS (n = 70)``, or "" (no criterion)."""
    row = table_row(r)
    if not row["verdict"]:
        return ""
    needed = f", n needed {row['n_needed']}" if row["n_needed"] else ""
    return f"{row['verdict']} (n = {row['n_text']}{_md(needed)})"


def render_markdown_summary(run_dir: Path) -> str:
    """A short Markdown summary of a run (for a Prefect artifact); writes nothing."""
    return markdown_summary(read_run(Path(run_dir)))
