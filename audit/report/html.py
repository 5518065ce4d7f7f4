"""Render a finished run directory into one self-contained HTML report (and a Markdown summary),
and the rules for where report files may be written.

The renderer only reads what the run recorded (``audit.store.rundir.read_run``); it recomputes no
score. A finished run directory is never modified: the report is written to
``RUN_DIR/report.html`` only when that file does not exist yet, otherwise the caller must name
another path (``out_html``).

Safety: Jinja2 autoescaping is on, every image and plot is an inline ``data:`` URI, the page
carries a Content-Security-Policy that forbids any request, and only whitelisted provenance fields
of ``run.json`` are shown (nothing else from the run's metadata, and no DICOM header is ever read).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from audit.store.files import atomic_write_text
from audit.store.rundir import read_run, table_records

from .context import build_context
from .format import fmt, method_label
from .markdown import markdown_summary

TEMPLATES = Path(__file__).parent / "templates"


class ReportExistsError(FileExistsError):
    """Raised instead of overwriting a file inside a (finished, immutable) run directory."""


@functools.lru_cache(maxsize=1)
def environment() -> Environment:
    """The report's Jinja environment, one per process: its compiled templates are kept
    (compiling them took ~0.5 s of each report; a changed template file is reloaded)."""
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    env.filters["method_label"] = method_label
    return env


# ---- where report files may be written -------------------------------------------------------


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def write_text(path: Path, text: str, exclusive: bool) -> None:
    """Write a report file: ``exclusive`` (inside a run directory) creates it only when absent,
    otherwise it is replaced atomically."""
    if not exclusive:
        atomic_write_text(path, text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x", encoding="utf-8") as fh:
            fh.write(text)
    except FileExistsError as exc:
        raise ReportExistsError(
            f"{path} already exists inside a run directory; a finished run directory is "
            "never modified — render to another path (out_html=...)") from exc


def resolve_output(run_dirs: list[Path], out_html: Path | None) -> tuple[Path, bool]:
    """(target path, inside a run directory?) — refusing to overwrite anything in a run dir."""
    if out_html is None:
        target = run_dirs[0] / "report.html"
        if target.exists():
            raise ReportExistsError(
                f"{target} already exists and a finished run directory is never modified; "
                "pass out_html=<a new path> to render the report elsewhere")
        return target, True
    target = Path(out_html)
    inside = any(_is_within(target, d) for d in run_dirs)
    if inside and target.exists():
        raise ReportExistsError(
            f"{target} already exists inside a run directory, which is never modified; "
            "choose a path outside the run directory or a new file name")
    return target, inside


# ---- the report --------------------------------------------------------------------------------


def _table_records(pp: pd.DataFrame) -> str:
    return json.dumps(table_records(pp), indent=1)


def render_report(
    run_dir: Path,
    out_html: Path | None = None,
    previous_run_dir: Path | None = None,
    comparison: pd.DataFrame | None = None,
) -> Path:
    """Render RUN_DIR into one self-contained HTML file and return its path.

    Default output: ``RUN_DIR/report.html``, only when that file does not exist yet (a finished
    run directory is never modified); otherwise pass ``out_html``. Beside the HTML it writes
    ``summary.md`` (inside the run directory only when absent) and, when rendering outside the
    run directory, ``report_table.csv`` / ``report_table.json`` (copies of per_pathology).
    ``previous_run_dir`` adds the "change since the previous run" section; ``comparison`` (e.g.
    the regression check's table) is shown there as given.
    """
    run_dir = Path(run_dir)
    data = read_run(run_dir)
    target, inside = resolve_output([run_dir], out_html)
    ctx = build_context(data, previous_run_dir, comparison)
    write_text(target, environment().get_template("report.html.j2").render(**ctx),
               exclusive=inside)
    summary = markdown_summary(data)
    companions = target.parent
    if inside:
        try:
            write_text(companions / "summary.md", summary, exclusive=True)
        except ReportExistsError:
            pass  # an earlier summary stays untouched
        return target
    write_text(companions / "summary.md", summary, exclusive=False)
    # exact copies of the run's per-pathology table (written from the DataFrame if absent)
    for ext in ("csv", "json"):
        src = run_dir / f"per_pathology.{ext}"
        if src.is_file():
            text = src.read_text(encoding="utf-8")
        elif data.per_pathology is not None:
            text = (data.per_pathology.to_csv(index=False) if ext == "csv"
                    else _table_records(data.per_pathology))
        else:
            continue
        write_text(companions / f"report_table.{ext}", text, exclusive=False)
    return target
