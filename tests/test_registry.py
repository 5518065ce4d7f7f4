"""The run registry (audit/store/registry.py `Registry`) on SQLite and PostgreSQL, the regression
check between two runs (audit/store/compare.py: paired bootstrap of new - old on the boxes both
run directories hold), and the `cxr-audit history` / `cxr-audit compare` commands on top of it.

The PostgreSQL variants run against a throwaway server (tests/pg.py) and are skipped, with the
reason, when it cannot be started.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pg import PostgresUnavailable, start_postgres
from typer.testing import CliRunner

from audit.store.compare import compare_runs
from audit.store.registry import Registry
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


N_IMAGES = 20  # image-finding units per (pathology, method) in the box tables below


def box_rows(pathology: str, method: str, iou: list[float], hits: list[bool]) -> list[dict]:
    """Box rows (one box per image) of one pathology and method, as run directories hold them."""
    return [{"image_key": f"{pathology}-{i}.png", "sha256": f"sha-{pathology}-{i}",
             "finding": pathology, "model_finding": pathology, "pathology": pathology,
             "box_index": 0, "method": method, "iou": v, "iobb": v, "coverage": v,
             "pointing_hit": h, "best_match": True}
            for i, (v, h) in enumerate(zip(iou, hits, strict=True))]


BASE_IOU = [0.2 + 0.02 * i for i in range(N_IMAGES)]
BASE_HITS = [i % 3 != 0 for i in range(N_IMAGES)]
ALTERNATING = [0.05 if i % 2 else -0.05 for i in range(N_IMAGES)]  # mean 0, both signs


def shifted(values: list[float], by) -> list[float]:
    steps = by if isinstance(by, list) else [by] * len(values)
    return [v + d for v, d in zip(values, steps, strict=True)]


def flip_two(hits: list[bool]) -> list[bool]:
    """One miss becomes a hit and one hit a miss: the rate is unchanged, pairs differ."""
    out = list(hits)
    out[0], out[1] = not out[0], not out[1]
    return out


def make_run_dir(root: Path, run_id: str, started_at: str, rows: list[dict],
                 fingerprint: str = FP_A, manifest_sha256: str = MANIFEST,
                 model_name: str = "densenet121-res224-nih",
                 boxes: list[dict] | None = None) -> Path:
    """A finished run directory as audit/run/ leaves it (the parts the registry reads): run.json,
    per_pathology.csv and, when given, boxes.csv."""
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
    if boxes is not None:
        pd.DataFrame(boxes).to_csv(run_dir / "boxes.csv", index=False)
    return run_dir


# The old run A and the new run B of the same model on the same manifest. The registry rows carry
# the verdicts; the box tables carry what the regression check pairs.
ROWS_A = [
    row("Mass", "gradcam", (0.40, 0.35, 0.45), (0.60, 0.50, 0.70), "PASS"),
    row("Mass", "gradcampp", (0.40, 0.35, 0.45), (0.60, 0.50, 0.70), "INCONCLUSIVE"),
    row("Nodule", "gradcam", (0.30, 0.25, 0.35), (0.50, 0.40, 0.60), "PASS"),
    row("Atelectasis", "gradcam", (0.20, 0.15, 0.25), (0.40, 0.30, 0.50), "FAIL"),
    row("Mass", "random", (0.10, 0.05, 0.15), (0.20, 0.10, 0.30), "", kind="baseline"),
    row("Effusion", "gradcam", (0.25, 0.20, 0.30), (0.55, 0.45, 0.65), "PASS"),  # only in A
]
ROWS_B = [
    row("Mass", "gradcam", (0.30, 0.25, 0.38), (0.60, 0.50, 0.70), "PASS"),
    row("Mass", "gradcampp", (0.40, 0.30, 0.45), (0.60, 0.48, 0.68), "INCONCLUSIVE"),
    row("Nodule", "gradcam", (0.29, 0.20, 0.36), (0.48, 0.38, 0.58), "FAIL"),
    row("Atelectasis", "gradcam", (0.35, 0.30, 0.40), (0.60, 0.50, 0.70), "PASS"),
    row("Mass", "random", (0.11, 0.06, 0.16), (0.21, 0.11, 0.31), "", kind="baseline"),
    row("Pneumothorax", "gradcam", (0.15, 0.10, 0.20), (0.30, 0.20, 0.40), "FAIL"),  # only in B
]
BOXES_A = [
    *box_rows("Mass", "gradcam", BASE_IOU, BASE_HITS),
    *box_rows("Mass", "gradcampp", BASE_IOU, BASE_HITS),
    *box_rows("Nodule", "gradcam", BASE_IOU, BASE_HITS),
    *box_rows("Atelectasis", "gradcam", BASE_IOU, BASE_HITS),
    *box_rows("Mass", "random", BASE_IOU, BASE_HITS),
    *box_rows("Effusion", "gradcam", BASE_IOU, BASE_HITS),
]
BOXES_B = [
    # (1) every image's IoU 0.1 lower: the paired CI lies wholly below 0 -> regression
    *box_rows("Mass", "gradcam", shifted(BASE_IOU, -0.1), BASE_HITS),
    # (2) IoU up on half the images, down on the others; two pointing outcomes swap: noise
    *box_rows("Mass", "gradcampp", shifted(BASE_IOU, ALTERNATING), flip_two(BASE_HITS)),
    # (3) PASS -> FAIL with a paired IoU change that straddles 0: not enough evidence
    *box_rows("Nodule", "gradcam", shifted(shifted(BASE_IOU, ALTERNATING), -0.01), BASE_HITS),
    # (4) an improvement
    *box_rows("Atelectasis", "gradcam", shifted(BASE_IOU, 0.15), [True] * N_IMAGES),
    *box_rows("Mass", "random", BASE_IOU, BASE_HITS),
    *box_rows("Pneumothorax", "gradcam", BASE_IOU, BASE_HITS),
]
# Everything better than A (and no pathology missing): compare(A, U) has no regression.
ROWS_U = [
    row(r["pathology"], r["method"],
        (r["iou_mean"] + 0.1, r["iou_mean_lo"] + 0.1, r["iou_mean_hi"] + 0.1),
        (r["pointing_rate"] + 0.1, r["pointing_lo"] + 0.1, r["pointing_hi"] + 0.1),
        "PASS" if r["kind"] == "method" else "", kind=r["kind"])
    for r in ROWS_A
]
BOXES_U = [dict(r, iou=r["iou"] + 0.1) for r in BOXES_A]

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
        "A": make_run_dir(root, "run-A", T_A, ROWS_A, boxes=BOXES_A),
        "B": make_run_dir(root, "run-B", T_B, ROWS_B, boxes=BOXES_B),
        "U": make_run_dir(root, "run-U", T_U, ROWS_U, boxes=BOXES_U),
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


def test_compare_flags_a_regression_only_when_the_paired_ci_is_below_zero(recorded):
    table, notes = recorded.compare("run-A", "run-B")
    assert notes == []
    rows = by_key(table)
    assert set(rows) == {(r["pathology"], r["method"]) for r in ROWS_A + ROWS_B}
    assert list(table[["pathology", "method"]].itertuples(index=False, name=None)) == sorted(rows)

    # (1) every unit 0.1 lower: the CI of new - old lies wholly below 0
    mass = rows[("Mass", "gradcam")]
    assert mass["regression"] is True
    assert mass["n_pairs"] == N_IMAGES
    assert mass["iou_diff"] == pytest.approx(-0.1)
    assert mass["iou_diff_hi"] < 0 and mass["iou_evidence"] == "regression"
    assert mass["iou_old"] == pytest.approx(np.mean(BASE_IOU))
    assert mass["pointing_evidence"] == "no change"
    assert mass["why"] == "iou: 95% CI of the paired difference new - old wholly below 0"

    # (2) noise in both directions: not enough evidence, not a regression
    noise = rows[("Mass", "gradcampp")]
    assert noise["iou_diff_lo"] < 0 < noise["iou_diff_hi"]
    assert noise["iou_evidence"] == "not enough evidence"
    assert noise["pointing_evidence"] == "not enough evidence"
    assert noise["regression"] is False and noise["why"] == ""
    assert (noise["verdict_old"], noise["verdict_new"]) == ("INCONCLUSIVE", "INCONCLUSIVE")

    # (3) PASS -> FAIL whose paired change straddles 0 is not a regression (the old rule
    # "PASS became FAIL" flagged it)
    nodule = rows[("Nodule", "gradcam")]
    assert (nodule["verdict_old"], nodule["verdict_new"]) == ("PASS", "FAIL")
    assert nodule["iou_diff"] == pytest.approx(-0.01)
    assert nodule["iou_evidence"] == "not enough evidence"
    assert nodule["regression"] is False

    # (4) an improvement
    atel = rows[("Atelectasis", "gradcam")]
    assert atel["iou_evidence"] == "improvement" and atel["pointing_evidence"] == "improvement"
    assert atel["regression"] is False

    assert rows[("Mass", "random")]["iou_evidence"] == "no change"

    # (5) pathologies present in one run only: nothing to pair, nothing judged
    gone, new = rows[("Effusion", "gradcam")], rows[("Pneumothorax", "gradcam")]
    assert gone["iou_evidence"] == "cannot judge (only in the old run)"
    assert new["pointing_evidence"] == "cannot judge (only in the new run)"
    assert gone["n_pairs"] == new["n_pairs"] == 0
    assert math.isnan(gone["iou_diff"])
    assert (gone["verdict_old"], gone["verdict_new"]) == ("PASS", "")
    assert not gone["regression"] and not new["regression"]

    assert sorted(k for k, r in rows.items() if r["regression"]) == [("Mass", "gradcam")]


def test_compare_improved_run_has_no_regression(recorded):
    table, _ = recorded.compare("run-A", "run-U")
    assert len(table) == len(ROWS_A)
    assert not table["regression"].any()
    assert (table["iou_diff"] > 0).all()
    assert set(table["iou_evidence"]) == {"improvement"}
    assert (table["why"] == "").all()


def test_compare_a_run_with_itself_has_no_regression(recorded):
    table, _ = recorded.compare("run-B", "run-B")
    assert not table["regression"].any()
    assert set(table["iou_evidence"]) == {"no change"}
    assert (table["iou_diff"] == 0).all()


def test_compare_pairs_only_the_images_both_runs_scored(make_registry, tmp_path):
    # the new run scored other images too, much worse; only the shared ten are compared
    reg = make_registry()
    rows = [row("Mass", "gradcam", (0.4, 0.3, 0.5), (0.6, 0.5, 0.7), "PASS")]
    old = box_rows("Mass", "gradcam", BASE_IOU[:10], BASE_HITS[:10])
    others = [dict(r, image_key=f"new-{i}", sha256=f"new-{i}", iou=0.0, pointing_hit=False)
              for i, r in enumerate(old)]
    reg.record_run(make_run_dir(tmp_path, "run-1", T_A, rows, boxes=old))
    reg.record_run(make_run_dir(tmp_path, "run-2", T_B, rows, boxes=old + others))
    (only,) = reg.compare("run-1", "run-2")[0].to_dict("records")
    assert only["n_pairs"] == 10
    assert only["iou_evidence"] == "no change" and only["regression"] is False


def test_compare_without_a_run_directory_cannot_judge(make_registry, run_dirs):
    import shutil

    reg = make_registry()
    reg.record_run(run_dirs["A"])
    reg.record_run(run_dirs["B"])
    shutil.rmtree(run_dirs["A"])
    table, notes = reg.compare("run-A", "run-B")
    assert notes == [f"run-A: run directory missing ({run_dirs['A'].resolve()}); cannot judge"]
    assert not table["regression"].any()
    both = table[table.n_pairs.eq(0) & table.verdict_old.ne("") & table.verdict_new.ne("")]
    assert len(both) == 4 and set(both["iou_evidence"]) == {
        "cannot judge (run directory missing)"}
    # the recorded aggregates are still shown, nothing is paired or guessed
    mass = by_key(table)[("Mass", "gradcam")]
    assert (mass["iou_old"], mass["iou_new"]) == pytest.approx((0.40, 0.30))
    assert math.isnan(mass["iou_diff"])


def test_compare_runs_on_plain_frames():
    old = pd.DataFrame([row("Mass", "gradcam", (0.4, 0.35, 0.45), (0.6, 0.5, 0.7), "PASS")])
    new = pd.DataFrame([row("Mass", "gradcam", (0.3, 0.25, 0.35), (0.6, 0.5, 0.7), "FAIL")])
    before = pd.DataFrame(box_rows("Mass", "gradcam", BASE_IOU, BASE_HITS))
    after = pd.DataFrame(box_rows("Mass", "gradcam", BASE_IOU, [False] * N_IMAGES))
    (only,) = compare_runs(old, new, before, after, n_boot=500).to_dict("records")
    assert only["pointing_evidence"] == "regression" and only["iou_evidence"] == "no change"
    assert only["pointing_diff"] == pytest.approx(-np.mean(BASE_HITS))
    assert only["regression"] is True
    assert only["why"] == "pointing: 95% CI of the paired difference new - old wholly below 0"
    (unjudged,) = compare_runs(old, new, before, None).to_dict("records")
    assert unjudged["regression"] is False
    assert unjudged["iou_evidence"] == "cannot judge (run directory missing)"


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
