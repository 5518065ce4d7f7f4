"""HTML audit report rendered from a finished run directory (nothing is recomputed).

Public API::

    render_report(run_dir, out_html=None, previous_run_dir=None, comparison=None) -> Path
    render_markdown_summary(run_dir) -> str
    render_side_by_side(run_dirs, out_html, calibration=None, labels=None) -> Path
    print_pdf(html, out_pdf=None) -> Path

Modules: ``html`` (the report page, Jinja environment, where report files may be written),
``context`` (the page's template context), ``pathology`` and ``sections`` (the section
builders), ``provenance`` (whitelisted run.json fields), ``format`` (cells, labels, order),
``markdown``, ``side_by_side``, ``pdf``, ``gallery`` and ``plots`` (images and charts).
"""

from .html import ReportExistsError, render_report
from .markdown import render_markdown_summary
from .pdf import print_pdf
from .side_by_side import render_side_by_side

__all__ = [
    "ReportExistsError",
    "print_pdf",
    "render_markdown_summary",
    "render_report",
    "render_side_by_side",
]
