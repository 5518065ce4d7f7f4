"""One owner of the run-directory format: `audit/store/rundir.py` names the files and columns,
the writer (audit/run/) and every reader (report, registry, calibration) go through it, and
docs/interfaces.md's run-directory section is generated from it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from audit.store import rundir

REPO = Path(__file__).resolve().parents[1]
#: Modules that read a finished run directory: none may open its files on its own.
READERS = ["audit/report", "audit/store/registry.py", "audit/phantom/calibration.py"]
#: Calls that read a file: pandas / numpy / json readers, Path.read_text / read_bytes, open().
FILE_READERS = {"pd.read_parquet", "pd.read_csv", "pd.read_json", "np.load", "json.load"}
PATH_READERS = {"read_text", "read_bytes"}
#: Files these modules may read that are not run-directory files, with the reason.
ALLOWED = {
    "audit/report/pathology.py": "the packaged reference_figures.json",
    "audit/report/html.py": "report_table.csv/.json are byte copies of per_pathology.csv/.json",
    "audit/report/pdf.py": "the rendered HTML it prints (its sha256 goes into the footer)",
}


def _calls_that_read(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "open":
            mode = node.args[1].value if len(node.args) > 1 and isinstance(
                node.args[1], ast.Constant) else "r"
            if "r" in mode:
                found.append((node.lineno, "open()"))
        elif isinstance(func, ast.Attribute):
            owner = func.value.id if isinstance(func.value, ast.Name) else ""
            if f"{owner}.{func.attr}" in FILE_READERS or func.attr in PATH_READERS:
                found.append((node.lineno, f"{owner}.{func.attr}()"))
    return found


def _python_files(spec: str) -> list[Path]:
    path = REPO / spec
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


@pytest.mark.parametrize("spec", READERS)
def test_run_directory_readers_open_no_file_themselves(spec: str) -> None:
    offenders = []
    for path in _python_files(spec):
        rel = str(path.relative_to(REPO))
        if rel in ALLOWED:
            continue
        offenders += [f"{rel}:{line} {call}"
                      for line, call in _calls_that_read(ast.parse(path.read_text()))]
    assert not offenders, offenders


def test_the_report_reads_the_run_through_read_run(tmp_path: Path, monkeypatch) -> None:
    from report_fixtures import build_run_dir

    import audit.report.html
    from audit.report import render_report

    run = build_run_dir(tmp_path / "run", n_boxes=6, findings=["Mass"], with_curves=False)
    calls = []
    original = rundir.read_run

    def spy(path):
        calls.append(Path(path))
        return original(path)

    assert audit.report.html.read_run is rundir.read_run  # the report's reader is the format's
    monkeypatch.setattr(audit.report.html, "read_run", spy)
    render_report(run, tmp_path / "out.html")
    assert calls and calls[0] == run


def test_docs_run_directory_section_is_generated_from_the_format_module() -> None:
    docs = (REPO / "docs" / "interfaces.md").read_text()
    assert rundir.format_markdown() in docs


def test_box_and_per_pathology_columns_name_every_hit_threshold() -> None:
    from audit.protocol import HIT_THRESHOLDS

    for t in HIT_THRESHOLDS:
        assert f"iou_hit_{t:g}" in rundir.BOX_COLUMNS
        assert f"iobb_hit_{t:g}_rate" in rundir.PER_PATHOLOGY_COLUMNS


def test_table_records_keep_never_as_inf_not_null() -> None:
    import numpy as np
    import pandas as pd

    table = pd.DataFrame({"verdict": ["INCONCLUSIVE", "INCONCLUSIVE", "PASS"],
                          "n_needed": [np.inf, 523.0, np.nan], "n_needed_approx": [False] * 3})
    records = rundir.table_records(table)
    assert [r["n_needed"] for r in records] == ["inf", 523.0, None]
    assert records[0]["n_needed_approx"] is False
