"""The built-in default: `cxr-audit demo` audits the phantom reference models and calibrates.

One demo run (the README's quick-start job) is shared by the tests of this module; the
calibration is then re-judged with runs given as the wrong model, which must fail (exit 1):
(a) a second random model (another seed, audited on the same set) as the honest one, (b) the
shortcut run as the honest one, (c) the honest run as the shortcut one.
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


def test_every_expected_verdict_is_decisive_and_met(demo_out) -> None:
    demo_dir, _ = demo_out
    table = pd.read_csv(demo_dir / "calibration.csv", keep_default_na=False)
    expected = table[table["expected"] != ""]
    assert {"honest", "shortcut", "random"} == set(expected["model"])
    assert (expected["verdict"] == expected["expected"]).all(), expected.to_string()
    random_rows = table[(table["model"] == "random") & (table["kind"] == "method")]
    assert "PASS" not in set(random_rows["verdict"]), random_rows.to_string()


@pytest.fixture(scope="module")
def second_random_run(demo_out, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random model with another seed (1; the demo's is 0) on the demo's test set: Grad-CAM
    and Grad-CAM++, localization only, maps saved; a finished run built in-process with the
    library calls of the `audit` flow (tests/run_fixtures.py)."""
    from audit.model import load_model
    from tests.run_fixtures import build_run_of_manifest

    demo_dir, _ = demo_out
    manifest = next((demo_dir / "manifests").glob("*.csv"))
    model = load_model(random_init=True, seed=1, device="cpu")
    run = build_run_of_manifest(model, manifest, tmp_path_factory.mktemp("random_seed1"),
                                methods=("gradcam", "gradcampp"), model_seed=1)
    return run.run_dir


def _calibrate(honest: Path, shortcut: Path, random: Path):
    from typer.testing import CliRunner

    from audit.cli import app

    return CliRunner().invoke(app, ["calibrate", "--honest", str(honest), "--shortcut",
                                    str(shortcut), "--random", str(random)])


def test_calibration_passes_with_the_runs_in_their_places(demo_out) -> None:
    runs = _runs(demo_out[0])
    same = _calibrate(runs["honest"], runs["shortcut"], runs["random"])
    assert same.exit_code == 0, same.output


def test_calibration_fails_with_another_random_model_as_the_honest_one(
        demo_out, second_random_run) -> None:
    runs = _runs(demo_out[0])
    swapped = _calibrate(second_random_run, runs["shortcut"], runs["random"])
    assert swapped.exit_code == 1, swapped.output
    assert "[FAIL] honest" in swapped.output


def test_calibration_fails_with_the_shortcut_run_as_the_honest_one(demo_out) -> None:
    runs = _runs(demo_out[0])
    swapped = _calibrate(runs["shortcut"], runs["shortcut"], runs["random"])
    assert swapped.exit_code == 1, swapped.output
    assert "[FAIL] honest" in swapped.output


def test_calibration_fails_with_the_honest_run_as_the_shortcut_one(demo_out) -> None:
    runs = _runs(demo_out[0])
    swapped = _calibrate(runs["honest"], runs["honest"], runs["random"])
    assert swapped.exit_code == 1, swapped.output
    assert "[FAIL] shortcut" in swapped.output


def test_every_demo_run_verifies_and_a_flipped_byte_does_not(demo_out, tmp_path: Path) -> None:
    """`cxr-audit verify` on each finished demo run exits 0 (registry, images, re-derived
    tables included); one flipped byte in a copy of the honest run exits 1 naming the file."""
    import shutil

    from typer.testing import CliRunner

    from audit.cli import app

    runs = _runs(demo_out[0])
    for kind, run_dir in runs.items():
        result = CliRunner().invoke(app, ["verify", str(run_dir)])
        assert result.exit_code == 0, (kind, result.output)
        for check in ("files", "per_pathology.csv", "registry", "images"):
            assert f"OK   {check}: " in result.output, (kind, check, result.output)
    copy = Path(shutil.copytree(runs["honest"], tmp_path / "honest"))
    data = bytearray((copy / "per_pathology.csv").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "per_pathology.csv").write_bytes(bytes(data))
    result = CliRunner().invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1 and "per_pathology.csv changed" in result.output
