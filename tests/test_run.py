"""audit/run/: a batch's box rows are the documented scoring (`localization_table`) of the same
maps, on square and non-square frames; the planner uses the tested sampler; the batch key
follows the code; settings are checked before any work; a run with nothing to score finishes
and registers."""

from __future__ import annotations

import csv
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from audit.config import AuditSettings, ConfigError, build_settings
from audit.data.manifest import ingest, read_manifest, read_sidecar
from audit.data.preprocess import nominal_range, preprocess, scale_boxes
from audit.data.readers import read_image
from audit.metrics.localization import localization_table
from audit.metrics.pointing import pointing_tolerance_px
from audit.model import load_model
from audit.run import plan
from audit.run.assemble import RunContext, assemble_run
from audit.run.batch import audit_batch
from audit.saliency import explain_all
from audit.store.registry import Registry
from audit.store.rundir import BOX_COLUMNS, RunDirectory, read_run, read_table

#: (file, width, height, [(finding, x, y, w, h), ...]) in the image's own frame
IMAGES = [
    ("wide.png", 640, 480, [("Mass", 100.0, 80.0, 150.0, 120.0),
                            ("Mass", 420.0, 300.0, 90.0, 70.0)]),
    ("tall.png", 360, 500, [("Effusion", 30.0, 250.0, 140.0, 200.0),
                            ("Infiltrate", 200.0, 60.0, 100.0, 160.0)]),
    ("square.png", 512, 512, [("Cardiomegaly", 150.0, 220.0, 230.0, 160.0)]),
]
METHODS = ["gradcam", "gradcampp"]
BASELINES = ["centre_prior"]


def _write_images(root: Path) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(5)
    rows = [["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", ""]]
    for name, w, h, boxes in IMAGES:
        yy, xx = np.mgrid[0:h, 0:w]
        img = 120 + 60 * np.sin(xx / 37.0) * np.cos(yy / 53.0) + rng.normal(0, 12, (h, w))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(images / name)
        rows += [[name, f, *(f"{v:g}" for v in box), ""] for f, *box in boxes]
    bboxes = root / "boxes.csv"
    with open(bboxes, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return images, bboxes


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_model(random_init=True, seed=0, device="cpu")


@pytest.fixture(scope="module")
def manifest_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run_data")
    images, bboxes = _write_images(root)
    return ingest(images, bboxes_csv=bboxes, name="nonsquare", out_dir=root / "manifests",
                  workers=1, progress=False).manifest_csv


def _settings(**overrides) -> AuditSettings:
    values = {"manifest": "m.csv", "random_init": True, "methods": METHODS,
              "baselines": BASELINES, "metrics": ["localization"], "batch_size": 8,
              "progress": False}
    values.update(overrides)
    return build_settings(values, {})


def _expected_rows(model, manifest: pd.DataFrame, images_root: Path,
                   threshold: float) -> pd.DataFrame:
    """The documented scoring, computed here from scratch: preprocess, explain, scale the boxes
    to the model's frame, `localization_table` with 15 px at the 1024 frame."""
    rows = []
    for key, group in manifest.groupby("image_key"):
        decoded = read_image(images_root / group["path"].iloc[0])
        pre = preprocess(decoded.pixels, 224, nominal_range(decoded.pixels, decoded.meta))
        findings = sorted(group["model_finding"].unique())
        targets = torch.tensor([[model.finding_index(f) for f in findings]])
        maps = explain_all(model, pre.tensor[None], targets, METHODS + BASELINES)
        for k, finding in enumerate(findings):
            boxes = group[group["model_finding"] == finding]
            in_model = scale_boxes(boxes[["box_x", "box_y", "box_w", "box_h"]].to_numpy(),
                                   pre.original_size, (224, 224))
            for method in METHODS + BASELINES:
                m = maps[method].maps[0, k].numpy().clip(0, None)
                table = localization_table(m[None], [in_model], threshold=threshold,
                                           tolerance_px=pointing_tolerance_px(224))
                table["image_key"] = key
                table["model_finding"] = finding
                table["method"] = method
                table["box_index"] = boxes["box_index"].to_numpy()[table["box_index"]]
                rows.append(table)
    return pd.concat(rows, ignore_index=True)


def test_batch_box_rows_equal_localization_table_on_square_and_non_square_frames(
        model, manifest_csv: Path, tmp_path: Path) -> None:
    manifest = read_manifest(manifest_csv)
    images_root = Path(read_sidecar(manifest_csv)["images_dir"])
    settings = _settings()
    out = audit_batch(model, manifest, images_root, settings, [], tmp_path / "batch")
    got = read_table(out, "boxes")
    keys = ["image_key", "model_finding", "method", "box_index"]
    got = got.sort_values(keys).reset_index(drop=True)
    want = _expected_rows(model, manifest, images_root, settings.threshold)
    want = want.sort_values(keys).reset_index(drop=True)
    assert len(got) == len(want) == 5 * 3
    assert set(BOX_COLUMNS) - {"run_id", "pathology"} <= set(got.columns)
    for column in ("iou", "iobb", "pointing_hit", "pointing_distance", "best_match", "status",
                   "iou_hit_0.1", "iobb_hit_0.5"):
        assert got[column].tolist() == pytest.approx(want[column].tolist(), nan_ok=True) \
            if got[column].dtype.kind == "f" else got[column].tolist() == want[column].tolist(), \
            column
    # predicted boxes back in each image's own frame
    sizes = {name: (w, h) for name, w, h, _ in IMAGES}
    for i, row in got.iterrows():
        w, h = sizes[row["image_key"]]
        back = scale_boxes(want.loc[i, ["pred_x", "pred_y", "pred_w", "pred_h"]].to_numpy(
            dtype=float), (224, 224), (w, h))
        np.testing.assert_allclose(row[["pred_x", "pred_y", "pred_w", "pred_h"]].to_numpy(
            dtype=float), back, rtol=1e-12)
        assert (row["width"], row["height"]) == (w, h)
    # the expert boxes themselves stay in the original frame, untouched
    merged = got.merge(manifest, on=["image_key", "box_index"], suffixes=("", "_m"))
    np.testing.assert_array_equal(merged["box_w"], merged["box_w_m"])


def test_nih_infiltrate_boxes_target_the_models_infiltration(model, manifest_csv: Path,
                                                              tmp_path: Path) -> None:
    manifest = read_manifest(manifest_csv)
    out = audit_batch(model, manifest, Path(read_sidecar(manifest_csv)["images_dir"]),
                      _settings(), [], tmp_path / "batch")
    boxes = read_table(out, "boxes")
    row = boxes[boxes["finding"] == "Infiltrate"].iloc[0]
    assert row["model_finding"] == "Infiltration"


def test_per_pathology_selection_is_the_tested_stratified_sample(manifest_csv: Path) -> None:
    from audit.metrics.sampling import stratified_sample

    manifest = read_manifest(manifest_csv)
    selection = plan.select_images(manifest, _settings(per_pathology=1, seed=7))
    expected = stratified_sample(manifest.dropna(subset=["box_x"]), 1, "finding", seed=7,
                                 unit_col="image_key")
    assert set(selection.manifest["image_key"]) == set(expected["image_key"])
    again = plan.select_images(manifest.sample(frac=1.0, random_state=3),
                               _settings(per_pathology=1, seed=7))
    assert set(again.manifest["image_key"]) == set(selection.manifest["image_key"])


def test_costly_pairs_are_drawn_per_model_finding_and_capped(manifest_csv: Path) -> None:
    manifest = read_manifest(manifest_csv)
    settings = _settings(metrics=["localization", "fidelity"], costly_per_pathology=1)
    pairs = plan.costly_pairs(manifest, settings)
    assert sorted(f for _, f in pairs) == sorted(manifest["model_finding"].unique())
    capped = plan.costly_pairs(manifest, _settings(metrics=["localization", "fidelity"],
                                                   costly_per_pathology=1, costly_max_pairs=2))
    assert len(capped) == 2 and set(capped) <= set(pairs)
    assert plan.costly_pairs(manifest, _settings()) == []  # localization only: no costly pairs


def test_batch_key_changes_when_any_source_file_of_the_package_changes(
        manifest_csv: Path, tmp_path: Path) -> None:
    copy = tmp_path / "audit"
    shutil.copytree(plan.PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__",
                                                                            "weights"))
    assert plan.code_fingerprint(copy) == plan.code_fingerprint(plan.PACKAGE_ROOT)
    preprocess_py = copy / "data" / "preprocess.py"
    preprocess_py.write_text(preprocess_py.read_text() + "\n# a change\n")
    plan.code_fingerprint.cache_clear()
    changed = plan.code_fingerprint(copy)
    assert changed != plan.code_fingerprint(plan.PACKAGE_ROOT)
    rows = read_manifest(manifest_csv)
    settings = _settings()
    before = plan.batch_cache_key(rows, [], "f" * 64, settings)
    assert before == plan.batch_cache_key(rows, [], "f" * 64, settings,
                                          code=plan.code_fingerprint(plan.PACKAGE_ROOT))
    assert before != plan.batch_cache_key(rows, [], "f" * 64, settings, code=changed)


@pytest.mark.parametrize("overrides,message", [
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"ig_steps": -3}, "ig_steps must be an integer >= 1"),
    ({"threshold": 1.5}, "threshold must lie in (0, 1)"),
    ({"threshold": 0.0}, "threshold must lie in (0, 1)"),
    ({"methods": ["lime"]}, "unknown method(s) ['lime']"),
    ({"per_pathology": 0}, "per_pathology must be an integer >= 1"),
    ({"ig_method": "simpson"}, "unknown ig_method 'simpson'"),
])
def test_bad_settings_are_refused_with_one_line(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _settings(**overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "0"], "batch_size must be an integer >= 1"),
    (["--ig-steps", "-1"], "ig_steps must be an integer >= 1"),
    (["--threshold", "1.5"], "threshold must lie in (0, 1)"),
    (["--methods", "gradcam,lime"], "unknown method(s) ['lime']"),
])
def test_cli_refuses_bad_settings_before_any_work_with_exit_2(
        flags: list[str], message: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from audit.cli import app

    result = CliRunner().invoke(app, ["run", "--manifest", str(tmp_path / "absent.csv"),
                                      "--random-init", "--out", str(tmp_path / "out"), *flags])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: {lines[0][7:]}"] and message in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_a_run_with_no_scored_box_finishes_registers_and_says_so(
        model, manifest_csv: Path, tmp_path: Path) -> None:
    """Images without boxes (and without labels): predicted, nothing to explain or score."""
    manifest = read_manifest(manifest_csv)
    unboxed = manifest.drop_duplicates("image_key").copy()
    for column in ("finding", "model_finding", "box_x", "box_y", "box_w", "box_h"):
        unboxed[column] = np.nan
    settings = _settings(out=str(tmp_path / "out"))
    selection = plan.select_images(unboxed, settings)
    batch = audit_batch(model, selection.manifest, Path(read_sidecar(manifest_csv)["images_dir"]),
                        settings, [], tmp_path / "batch")
    run = RunDirectory.create(tmp_path / "out", "run-test-empty")
    context = RunContext(selection=selection, settings=settings, model=model,
                         manifest_csv=manifest_csv, manifest_sidecar=read_sidecar(manifest_csv),
                         started_at=datetime.now(timezone.utc), timings={}, host="test")
    assemble_run(run, [batch], context)
    from audit.report import render_report

    html = render_report(run.staging).read_text()
    final = run.finish()
    registry = Registry(f"sqlite:///{tmp_path / 'registry.sqlite'}")
    assert registry.record_run(final) == "run-test-empty"
    assert registry.history()["run_id"].tolist() == ["run-test-empty"]
    data = read_run(final)
    assert data.boxes.empty and data.per_pathology.empty
    assert len(data.predictions) == 3 * len([p for p in model.pathologies if p])
    assert "No box was scored in this run" in html
