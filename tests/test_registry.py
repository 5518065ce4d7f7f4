"""The run registry (audit/store/registry.py `Registry`, `compare_results`) on SQLite and
PostgreSQL, and the `cxr-audit history` / `cxr-audit compare` commands on top of it.

The PostgreSQL variants run against a throwaway server (tests/pg.py) and are skipped, with the
reason, when it cannot be started.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from pg import PostgresUnavailable, start_postgres
from typer.testing import CliRunner

from audit.store.registry import Registry, compare_results
from tests.external import missing

FP_A = "a" * 64  # model fingerprint of the audited model
FP_OTHER = "b" * 64  # another model
MANIFEST = "1" * 64
OTHER_MANIFEST = "2" * 64

PER_PATHOLOGY_COLUMNS = [
    "pathology", "method", "kind", "n", "iou_mean", "iou_mean_lo", "iou_mean_hi", "iou_median",
    "pointing_rate", "pointing_lo", "pointing_hi", "iobb_hit_0.1_rate", "iobb_hit_0.25_rate",
    "iobb_hit_0.5_rate", "iou_hit_0.1_rate", "iou_hit_0.25_rate", "iou_hit_0.5_rate", "verdict",
    "criteria",
]


def row(pathology: str, method: str, iou: tuple[float, float, float],
        pointing: tuple[float, float, float], verdict: str, kind: str = "method",
        n: int = 20) -> dict:
    mean, lo, hi = iou
    p, p_lo, p_hi = pointing
    return {
        "pathology": pathology, "method": method, "kind": kind, "n": n,
        "iou_mean": mean, "iou_mean_lo": lo, "iou_mean_hi": hi, "iou_median": mean,
        "pointing_rate": p, "pointing_lo": p_lo, "pointing_hi": p_hi,
        "iobb_hit_0.1_rate": 0.9, "iobb_hit_0.25_rate": 0.7, "iobb_hit_0.5_rate": 0.4,
        "iou_hit_0.1_rate": 0.8, "iou_hit_0.25_rate": 0.5, "iou_hit_0.5_rate": 0.2,
        "verdict": verdict,
        "criteria": "" if kind == "baseline" else "pointing_lo > centre_prior pointing",
    }


def make_run_dir(root: Path, run_id: str, started_at: str, rows: list[dict],
                 fingerprint: str = FP_A, manifest_sha256: str = MANIFEST,
                 model_name: str = "densenet121-res224-nih") -> Path:
    """A finished run directory as audit/pipeline.py leaves it (the parts the registry reads)."""
    run_dir = root / run_id
    run_dir.mkdir(parents=True)
    run_json = {
        "run_id": run_id,
        "started_at": started_at,
        "finished_at": started_at,
        "status": "finished",
        "model": {"name": model_name, "fingerprint": fingerprint, "source": "weights",
                  "seed": 0, "published": True},
        "dataset": {"name": "nih_bbox_dev", "manifest_path": "m.csv",
                    "manifest_sha256": manifest_sha256, "n_images": 438, "n_boxes": 491},
        "settings": {"methods": ["gradcam", "gradcampp"], "threshold": 0.15},
    }
    (run_dir / "run.json").write_text(json.dumps(run_json, indent=2))
    pd.DataFrame(rows, columns=PER_PATHOLOGY_COLUMNS).to_csv(
        run_dir / "per_pathology.csv", index=False)
    return run_dir


# The old run A and the new run B of the same model on the same manifest.
ROWS_A = [
    row("Mass", "gradcam", (0.40, 0.35, 0.45), (0.60, 0.50, 0.70), "PASS"),
    row("Mass", "gradcampp", (0.40, 0.35, 0.45), (0.60, 0.50, 0.70), "PASS"),
    row("Nodule", "gradcam", (0.30, 0.25, 0.35), (0.50, 0.40, 0.60), "PASS"),
    row("Atelectasis", "gradcam", (0.20, 0.15, 0.25), (0.40, 0.30, 0.50), "FAIL"),
    row("Mass", "random", (0.10, 0.05, 0.15), (0.20, 0.10, 0.30), "", kind="baseline"),
    row("Effusion", "gradcam", (0.25, 0.20, 0.30), (0.55, 0.45, 0.65), "PASS"),  # only in A
]
ROWS_B = [
    # (1) new IoU CI entirely below the old mean (0.38 < 0.40), verdict unchanged
    row("Mass", "gradcam", (0.30, 0.25, 0.38), (0.60, 0.50, 0.70), "PASS"),
    # a small drop whose CI still covers the old mean: noise, not a regression
    row("Mass", "gradcampp", (0.38, 0.30, 0.45), (0.58, 0.48, 0.68), "PASS"),
    # (2) PASS -> FAIL with CIs that still cover the old means
    row("Nodule", "gradcam", (0.29, 0.20, 0.36), (0.48, 0.38, 0.58), "FAIL"),
    # (3) an improvement, FAIL -> PASS
    row("Atelectasis", "gradcam", (0.35, 0.30, 0.40), (0.60, 0.50, 0.70), "PASS"),
    row("Mass", "random", (0.11, 0.06, 0.16), (0.21, 0.11, 0.31), "", kind="baseline"),
    row("Pneumothorax", "gradcam", (0.15, 0.10, 0.20), (0.30, 0.20, 0.40), "FAIL"),  # only in B
]
# Everything better than A (and no pathology missing): compare(A, U) has no regression.
ROWS_U = [
    row(r["pathology"], r["method"],
        (r["iou_mean"] + 0.1, r["iou_mean_lo"] + 0.1, r["iou_mean_hi"] + 0.1),
        (r["pointing_rate"] + 0.1, r["pointing_lo"] + 0.1, r["pointing_hi"] + 0.1),
        "PASS" if r["kind"] == "method" else "", kind=r["kind"])
    for r in ROWS_A
]

T_A = "2025-11-20T02:00:00+00:00"
T_OTHER_MODEL = "2025-11-21T02:00:00+00:00"
T_OTHER_MANIFEST = "2025-11-22T02:00:00+00:00"
T_B = "2025-11-27T02:00:00+00:00"
T_U = "2025-11-28T02:00:00+00:00"


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
    made: list[Registry] = []

    def make() -> Registry:
        reg = Registry(db_url)
        made.append(reg)
        return reg

    yield make
    for reg in made:
        reg.engine.dispose()


@pytest.fixture
def run_dirs(tmp_path) -> dict[str, Path]:
    root = tmp_path / "reports"
    other_model_rows = [row("Mass", "gradcam", (0.9, 0.85, 0.95), (0.9, 0.8, 1.0), "PASS")]
    return {
        "A": make_run_dir(root, "run-A", T_A, ROWS_A),
        "B": make_run_dir(root, "run-B", T_B, ROWS_B),
        "U": make_run_dir(root, "run-U", T_U, ROWS_U),
        "other_model": make_run_dir(root, "run-other-model", T_OTHER_MODEL, other_model_rows,
                                    fingerprint=FP_OTHER, model_name="resnet50"),
        "other_manifest": make_run_dir(root, "run-other-manifest", T_OTHER_MANIFEST,
                                       other_model_rows, manifest_sha256=OTHER_MANIFEST),
    }


@pytest.fixture
def recorded(make_registry, run_dirs) -> Registry:
    """A registry holding all the runs, recorded newest first (order must not matter)."""
    reg = make_registry()
    for name in ("U", "B", "other_manifest", "other_model", "A"):
        reg.record_run(run_dirs[name])
    return reg


def by_key(table: pd.DataFrame) -> dict[tuple[str, str], dict]:
    return {(r["pathology"], r["method"]): r for r in table.to_dict("records")}


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


def test_compare_deltas_and_regressions(recorded):
    table = recorded.compare("run-A", "run-B")
    rows = by_key(table)
    assert set(rows) == {(r["pathology"], r["method"]) for r in ROWS_A + ROWS_B}
    assert list(table[["pathology", "method"]].itertuples(index=False, name=None)) == sorted(rows)

    # (1) new CI entirely below the old mean
    mass = rows[("Mass", "gradcam")]
    assert mass["regression"] is True
    assert "iou_mean CI below previous mean" in mass["why"]
    assert "PASS became FAIL" not in mass["why"]
    assert mass["iou_mean_old"] == pytest.approx(0.40)
    assert mass["iou_mean_new"] == pytest.approx(0.30)
    assert mass["iou_mean_delta"] == pytest.approx(-0.10)
    assert mass["iou_mean_hi_new"] == pytest.approx(0.38)
    assert mass["pointing_rate_delta"] == pytest.approx(0.0)

    # a drop within the CI is not a regression
    pp = rows[("Mass", "gradcampp")]
    assert pp["regression"] is False and pp["why"] == ""
    assert pp["iou_mean_delta"] == pytest.approx(-0.02)

    # (2) PASS -> FAIL
    nodule = rows[("Nodule", "gradcam")]
    assert nodule["regression"] is True
    assert nodule["why"] == "PASS became FAIL"
    assert (nodule["verdict_old"], nodule["verdict_new"]) == ("PASS", "FAIL")

    # (3) an improvement (and FAIL -> PASS) is not a regression
    atel = rows[("Atelectasis", "gradcam")]
    assert atel["regression"] is False and atel["why"] == ""
    assert atel["iou_mean_delta"] == pytest.approx(0.15)
    assert atel["pointing_rate_delta"] == pytest.approx(0.20)

    baseline = rows[("Mass", "random")]
    assert baseline["regression"] is False
    assert (baseline["verdict_old"], baseline["verdict_new"]) == ("", "")

    # (4) pathologies present in one run only: NaNs, no regression, no crash
    gone = rows[("Effusion", "gradcam")]
    assert gone["iou_mean_old"] == pytest.approx(0.25)
    assert math.isnan(gone["iou_mean_new"]) and math.isnan(gone["iou_mean_delta"])
    assert math.isnan(gone["pointing_rate_new"])
    assert (gone["verdict_old"], gone["verdict_new"]) == ("PASS", "")
    assert gone["regression"] is False
    new = rows[("Pneumothorax", "gradcam")]
    assert math.isnan(new["iou_mean_old"]) and math.isnan(new["iou_mean_delta"])
    assert new["iou_mean_new"] == pytest.approx(0.15)
    assert (new["verdict_old"], new["verdict_new"]) == ("", "FAIL")
    assert new["regression"] is False

    assert sorted(k for k, r in rows.items() if r["regression"]) == [
        ("Mass", "gradcam"), ("Nodule", "gradcam")]


def test_compare_pointing_ci_below_previous_mean(make_registry, tmp_path):
    reg = make_registry()
    old = [row("Mass", "gradcam", (0.4, 0.3, 0.5), (0.70, 0.60, 0.80), "")]
    new = [row("Mass", "gradcam", (0.4, 0.3, 0.5), (0.50, 0.40, 0.65), "")]
    reg.record_run(make_run_dir(tmp_path, "run-1", T_A, old))
    reg.record_run(make_run_dir(tmp_path, "run-2", T_B, new))
    (only,) = reg.compare("run-1", "run-2").to_dict("records")
    assert only["regression"] is True
    assert only["why"] == "pointing_rate CI below previous mean"
    assert only["pointing_rate_delta"] == pytest.approx(-0.20)


def test_compare_both_reasons_are_listed(make_registry, tmp_path):
    reg = make_registry()
    old = [row("Mass", "gradcam", (0.4, 0.35, 0.45), (0.7, 0.6, 0.8), "PASS")]
    new = [row("Mass", "gradcam", (0.2, 0.15, 0.25), (0.3, 0.2, 0.4), "FAIL")]
    reg.record_run(make_run_dir(tmp_path, "run-1", T_A, old))
    reg.record_run(make_run_dir(tmp_path, "run-2", T_B, new))
    (only,) = reg.compare("run-1", "run-2").to_dict("records")
    assert only["regression"] is True
    assert only["why"].split("; ") == [
        "iou_mean CI below previous mean", "pointing_rate CI below previous mean",
        "PASS became FAIL"]


def test_compare_improved_run_has_no_regression(recorded):
    table = recorded.compare("run-A", "run-U")
    assert len(table) == len(ROWS_A)
    assert not table["regression"].any()
    assert (table["iou_mean_delta"] > 0).all()
    assert (table["why"] == "").all()


def test_compare_a_run_with_itself_has_no_regression(recorded):
    table = recorded.compare("run-B", "run-B")
    assert not table["regression"].any()
    assert (table["iou_mean_delta"] == 0).all()


def test_compare_with_a_column_null_in_every_row(make_registry, tmp_path):
    # e.g. a tiny run where no CI could be computed: the database gives back None objects
    reg = make_registry()
    old = [row("Mass", "gradcam", (0.4, float("nan"), float("nan")),
               (float("nan"),) * 3, ""),
           row("Nodule", "gradcam", (0.3, float("nan"), float("nan")),
               (float("nan"),) * 3, "")]
    new = [row("Mass", "gradcam", (0.1, 0.05, 0.2), (0.5, 0.4, 0.6), ""),
           row("Nodule", "gradcam", (0.3, 0.2, 0.4), (0.5, 0.4, 0.6), "")]
    reg.record_run(make_run_dir(tmp_path, "run-1", T_A, old))
    reg.record_run(make_run_dir(tmp_path, "run-2", T_B, new))
    assert reg.results("run-1")["pointing_hi"].dtype.kind == "f"
    forward = by_key(reg.compare("run-1", "run-2"))
    assert forward[("Mass", "gradcam")]["why"] == "iou_mean CI below previous mean"
    assert math.isnan(forward[("Mass", "gradcam")]["pointing_rate_delta"])
    assert forward[("Nodule", "gradcam")]["regression"] is False
    backward = reg.compare("run-2", "run-1")  # new CIs unknown: nothing can be flagged
    assert not backward["regression"].any()


def test_compare_results_on_plain_frames():
    old = pd.DataFrame([row("Mass", "gradcam", (0.4, 0.35, 0.45), (0.6, 0.5, 0.7), "PASS")])
    new = pd.DataFrame([row("Mass", "gradcam", (0.3, 0.25, 0.35), (0.6, 0.5, 0.7), "PASS")])
    new.loc[0, "pointing_lo"] = None
    table = compare_results(old, new)
    assert table["regression"].tolist() == [True]
    assert table["why"].tolist() == ["iou_mean CI below previous mean"]


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
    assert "iou_mean CI below previous mean" in out
    assert "PASS became FAIL" in out
    assert "-0.100" in out  # the Mass/gradcam IoU delta, 3 decimals
    assert "2 regression(s)" in result.stderr


def test_cli_compare_exits_0_without_regression(cli, recorded, db_url):
    result = cli("compare", "run-A", "run-U", "--registry", db_url)
    assert result.exit_code == 0, result.output
    assert "Mass" in result.stdout and "regression(s)" not in result.output


def test_cli_compare_json(cli, recorded, db_url):
    result = cli("compare", "run-A", "run-B", "--registry", db_url, "--json")
    assert result.exit_code == 1
    rows = json.loads(result.stdout)
    flagged = {(r["pathology"], r["method"]) for r in rows if r["regression"]}
    assert flagged == {("Mass", "gradcam"), ("Nodule", "gradcam")}
    gone = next(r for r in rows if r["pathology"] == "Effusion")
    assert gone["iou_mean_new"] is None  # NaN -> null


def test_cli_uses_the_environment_registry(cli, recorded, db_url, monkeypatch):
    monkeypatch.setenv("CXR_AUDIT_REGISTRY", db_url)
    result = cli("history")
    assert result.exit_code == 0
    assert "run-B" in result.stdout
