"""HTML audit report rendered from a finished run directory (nothing is recomputed).

Public API::

    render_report(run_dir, out_html=None, previous_run_dir=None, comparison=None) -> Path
    render_markdown_summary(run_dir) -> str
    render_side_by_side(run_dirs, out_html, calibration=None, labels=None) -> Path
"""

from .render import (
    ReportExistsError,
    render_html,
    render_markdown_summary,
    render_report,
    render_side_by_side,
)

__all__ = [
    "ReportExistsError",
    "render_html",
    "render_markdown_summary",
    "render_report",
    "render_side_by_side",
]
