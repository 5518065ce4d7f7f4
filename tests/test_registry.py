"""The run registry (audit/store/registry.py `Registry`) on SQLite and PostgreSQL, and the
`cxr-audit history` / `cxr-audit compare` commands on top of it (the regression check itself:
tests/test_compare.py; the run directories: tests/registry_fixtures.py).

The PostgreSQL variants run against a throwaway server (tests/pg.py) and are skipped, with the
reason, when it cannot be started.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from pg import PostgresUnavailable, start_postgres
from registry_fixtures import (
    FP_A,
    MANIFEST,
    ROWS_A,
    T_A,
    by_key,
    make_run_dir,
    make_run_dirs,
    record,
    registries,
    row,
)
from typer.testing import CliRunner

from audit.store.registry import Registry
from tests.external import missing

# ---------------------------------------------------------------------------------------------
# fixtures: one registry URL per backend


@pytest.fixture(scope="session")
def pg_server():
    try:
        server = start_postgres()
    except PostgresUnavailable as err:
        missing("postgresql", f"the throwaway PostgreSQL server could not start: {err}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_database(pg_server) -> str:
    return pg_server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """An empty registry database (tables are created by Registry)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.sqlite'}"
    url = request.getfixturevalue("pg_database")
    from sqlalchemy import create_engine

    from audit.store.registry import _metadata

    engine = create_engine(url)  # one database for the session, emptied before each test
    try:
        _metadata.drop_all(engine)
    finally:
        engine.dispose()
    return url


@pytest.fixture
def make_registry(db_url):
    with registries(db_url) as make:
        yield make


@pytest.fixture
def run_dirs(tmp_path) -> dict[str, Path]:
    return make_run_dirs(tmp_path / "reports")


@pytest.fixture
def recorded(make_registry, run_dirs) -> Registry:
    """A registry holding all the runs, recorded newest first (order must not matter)."""
    return record(make_registry(), run_dirs, ("U", "B", "other_manifest", "other_model", "A"))



# ---------------------------------------------------------------------------------------------
# recording and reading


def test_record_two_runs_history_in_time_order(make_registry, run_dirs):
    reg = make_registry()
    assert reg.history().empty
    # record the newer run first: history orders by start time, not insertion
    assert reg.record_run(run_dirs["B"]) == "run-B"
    assert reg.record_run(run_dirs["A"]) == "run-A"
    hist = reg.history()
    assert hist["run_id"].tolist() == ["run-A", "run-B"]
    first = hist.iloc[0]
    assert first["model_fingerprint"] == FP_A
    assert first["manifest_sha256"] == MANIFEST
    assert first["model_name"] == "densenet121-res224-nih"
    assert first["dataset_name"] == "nih_bbox_dev"
    assert (first["n_images"], first["n_boxes"]) == (438, 491)
    assert first["status"] == "finished"
    assert Path(first["run_dir"]) == run_dirs["A"].resolve()
    assert json.loads(first["settings_json"])["threshold"] == 0.15
    started = pd.Timestamp(first["started_at"])
    if started.tzinfo is None:  # SQLite gives back naive UTC
        started = started.tz_localize("UTC")
    assert started == pd.Timestamp(T_A)


def test_history_orders_by_instant_across_utc_offsets(make_registry, tmp_path):
    # 13:00+05:00 is 08:00Z, earlier than 12:00Z, although its wall-clock digits are later
    reg = make_registry()
    rows = [row("Mass", "gradcam", (0.4, 0.3, 0.5), (0.6, 0.5, 0.7), "PASS")]
    reg.record_run(make_run_dir(tmp_path, "run-noon-utc", "2025-11-20T12:00:00+00:00", rows))
    reg.record_run(make_run_dir(tmp_path, "run-1pm-plus5", "2025-11-20T13:00:00+05:00", rows))
    assert reg.history()["run_id"].tolist() == ["run-1pm-plus5", "run-noon-utc"]
    assert reg.previous_run("run-noon-utc") == "run-1pm-plus5"
    assert reg.previous_run("run-1pm-plus5") is None


def test_results_returns_the_per_pathology_rows(recorded):
    res = recorded.results("run-A")
    assert len(res) == len(ROWS_A)
    assert set(res["run_id"]) == {"run-A"}
    rows = by_key(res)
    assert set(rows) == {(r["pathology"], r["method"]) for r in ROWS_A}
    mass = rows[("Mass", "gradcam")]
    assert mass["kind"] == "method" and mass["n"] == 20 and mass["verdict"] == "PASS"
    assert (mass["iou_mean"], mass["iou_mean_lo"], mass["iou_mean_hi"]) == pytest.approx(
        (0.40, 0.35, 0.45))
    assert (mass["pointing_rate"], mass["pointing_lo"], mass["pointing_hi"]) == pytest.approx(
        (0.60, 0.50, 0.70))
    baseline = rows[("Mass", "random")]
    assert baseline["kind"] == "baseline"
    verdict = baseline["verdict"]  # empty: no criterion applies (NULL in the database)
    assert verdict == "" or pd.isna(verdict)


def test_results_of_an_unknown_run_raises_key_error(recorded):
    with pytest.raises(KeyError, match="run-nope"):
        recorded.results("run-nope")


def test_re_recording_replaces_rows(make_registry, run_dirs, tmp_path):
    reg = make_registry()
    reg.record_run(run_dirs["A"])
    reg.record_run(run_dirs["A"])
    assert reg.history()["run_id"].tolist() == ["run-A"]
    assert len(reg.results("run-A")) == len(ROWS_A)

    # the same run id from a re-rendered directory: fewer rows, other values
    changed = [dict(r) for r in ROWS_A[:2]]
    changed[0]["iou_mean"] = 0.123
    again = make_run_dir(tmp_path / "elsewhere", "run-A", T_A, changed)
    reg.record_run(again)
    res = reg.results("run-A")
    assert len(res) == 2
    assert by_key(res)[("Mass", "gradcam")]["iou_mean"] == pytest.approx(0.123)
    hist = reg.history()
    assert hist["run_id"].tolist() == ["run-A"]
    assert Path(hist.iloc[0]["run_dir"]) == again.resolve()


def test_a_second_registry_on_the_same_url_sees_the_runs(recorded, make_registry):
    # tables are created idempotently; data persists across connections
    assert make_registry().history()["run_id"].tolist() == [
        "run-A", "run-other-model", "run-other-manifest", "run-B", "run-U"]


def test_record_run_of_an_unfinished_directory_fails(make_registry, tmp_path):
    from audit.store.rundir import RunDirectoryError

    (tmp_path / ".run-X.partial").mkdir()
    with pytest.raises(RunDirectoryError):
        make_registry().record_run(tmp_path / ".run-X.partial")


# ---------------------------------------------------------------------------------------------
# previous run


def test_previous_run_same_model_and_manifest_only(recorded):
    # other_model and other_manifest started between A and B; they must be ignored
    assert recorded.previous_run("run-B") == "run-A"
    assert recorded.previous_run("run-U") == "run-B"
    assert recorded.previous_run("run-A") is None
    assert recorded.previous_run("run-other-model") is None
    assert recorded.previous_run("run-other-manifest") is None
    assert recorded.previous_run("run-unknown") is None


# ---------------------------------------------------------------------------------------------
# compare


def test_the_registry_stores_inconclusive_verdicts(recorded):
    verdicts = by_key(recorded.results("run-A"))
    assert verdicts[("Mass", "gradcampp")]["verdict"] == "INCONCLUSIVE"
    assert verdicts[("Atelectasis", "gradcam")]["verdict"] == "FAIL"


def test_a_registry_with_a_short_verdict_column_is_widened(db_url, tmp_path, make_registry):
    # a database created when verdicts were PASS/FAIL (VARCHAR(8)) must take INCONCLUSIVE
    from sqlalchemy import Column, Float, Integer, MetaData, String, Table, create_engine

    engine = create_engine(db_url)
    old = MetaData()
    numbers = ("iou_mean", "iou_mean_lo", "iou_mean_hi", "pointing_rate", "pointing_lo",
               "pointing_hi")
    Table("pathology_results", old, Column("run_id", String(64), primary_key=True),
          Column("pathology", String(64), primary_key=True),
          Column("method", String(64), primary_key=True), Column("kind", String(16)),
          Column("n", Integer), *(Column(name, Float) for name in numbers),
          Column("verdict", String(8)))
    old.create_all(engine)
    engine.dispose()
    reg = make_registry()
    rows = [row("Mass", "gradcam", (0.4, 0.3, 0.5), (0.6, 0.5, 0.7), "INCONCLUSIVE")]
    reg.record_run(make_run_dir(tmp_path, "run-1", T_A, rows))
    assert reg.results("run-1")["verdict"].tolist() == ["INCONCLUSIVE"]


# ---------------------------------------------------------------------------------------------
# the CLI


@pytest.fixture
def cli():
    from audit.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args), catch_exceptions=False)

    return invoke


def test_cli_history_lists_the_runs(cli, recorded, db_url):
    result = cli("history", "--registry", db_url)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "run_id" in lines[0] and "model_name" in lines[0]
    listed = [line.split()[0] for line in lines[1:]]
    assert listed == ["run-A", "run-other-model", "run-other-manifest", "run-B", "run-U"]
    assert FP_A[:12] in result.stdout and FP_A[:13] not in result.stdout
    assert "resnet50" in result.stdout


def test_cli_history_of_an_empty_registry(cli, tmp_path):
    result = cli("history", "--registry", str(tmp_path / "empty.sqlite"))
    assert result.exit_code == 0
    assert "no runs recorded" in result.stdout


def test_cli_compare_exits_1_on_regression(cli, recorded, db_url):
    result = cli("compare", "run-A", "run-B", "--registry", db_url)
    assert result.exit_code == 1, result.output
    out = result.stdout
    for name in ("Mass", "Nodule", "Atelectasis", "Effusion", "Pneumothorax"):
        assert name in out
    assert "wholly below 0" in out
    assert "not enough evidence" in out
    assert "-0.100" in out  # the Mass/gradcam paired IoU difference, 3 decimals
    assert "1 regression(s)" in result.stderr


def test_cli_compare_exits_0_without_regression(cli, recorded, db_url):
    result = cli("compare", "run-A", "run-U", "--registry", db_url)
    assert result.exit_code == 0, result.output
    assert "Mass" in result.stdout and "regression(s)" not in result.output
    assert "no regression" in result.stderr


def test_cli_compare_with_a_run_directory_gone_exits_0_and_says_why(cli, recorded, db_url,
                                                                     run_dirs):
    import shutil

    shutil.rmtree(run_dirs["B"])
    result = cli("compare", "run-A", "run-B", "--registry", db_url)
    assert result.exit_code == 0, result.output
    assert "warning: run-B: run directory missing" in result.stderr
    assert "cannot judge (run directory missing)" in result.stdout


def test_cli_compare_json(cli, recorded, db_url):
    result = cli("compare", "run-A", "run-B", "--registry", db_url, "--json")
    assert result.exit_code == 1
    rows = json.loads(result.stdout)
    flagged = {(r["pathology"], r["method"]) for r in rows if r["regression"]}
    assert flagged == {("Mass", "gradcam")}
    gone = next(r for r in rows if r["pathology"] == "Effusion")
    assert gone["iou_diff"] is None  # NaN -> null


def test_cli_uses_the_environment_registry(cli, recorded, db_url, monkeypatch):
    monkeypatch.setenv("CXR_AUDIT_REGISTRY", db_url)
    result = cli("history")
    assert result.exit_code == 0
    assert "run-B" in result.stdout
