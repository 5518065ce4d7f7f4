"""The built-in default: `cxr-audit demo` audits the phantom reference models and calibrates.

One demo run (the README's quick-start job) is shared by the tests of this module; the
calibration is then re-judged with the honest run swapped for the random one, which must fail.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # end to end: CI runs it, `-m "not slow"` skips it


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory, prefect_server
             ) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo")
    env = prefect_server.client_env(home=out / "prefect_home")  # the session's Prefect server
    proc = subprocess.run([sys.executable, "-m", "audit.cli", "demo", "--out", str(out / "demo"),
                           "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=1800)
    return out / "demo", proc


def _runs(demo_dir: Path) -> dict[str, Path]:
    runs: dict[str, Path] = {}
    for line in (demo_dir / "runs.txt").read_text().splitlines():
        kind, path = line.split("\t")
        runs[kind] = Path(path)
    return runs


def test_demo_passes_its_calibration_and_writes_the_report(demo_out) -> None:
    demo_dir, proc = demo_out
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "report:" in proc.stdout
    report = demo_dir / "demo_report.html"
    assert report.is_file() and report.stat().st_size > 10_000
    checks = pd.read_csv(demo_dir / "calibration_checks.csv")
    assert checks["passed"].all(), checks.to_string()
    assert {"honest", "shortcut", "random"} == set(checks["model"])
    for run_dir in _runs(demo_dir).values():
        assert (run_dir / "report.html").is_file()


def test_calibration_fails_when_the_honest_model_is_swapped_for_the_random_one(demo_out) -> None:
    demo_dir, _ = demo_out
    runs = _runs(demo_dir)
    from typer.testing import CliRunner

    from audit.cli import app

    swapped = CliRunner().invoke(app, ["calibrate", "--honest", str(runs["random"]),
                                       "--shortcut", str(runs["shortcut"]),
                                       "--random", str(runs["random"])])
    assert swapped.exit_code == 1, swapped.output
    assert "FAIL" in swapped.output
    same = CliRunner().invoke(app, ["calibrate", "--honest", str(runs["honest"]),
                                    "--shortcut", str(runs["shortcut"]),
                                    "--random", str(runs["random"])])
    assert same.exit_code == 0, same.output
