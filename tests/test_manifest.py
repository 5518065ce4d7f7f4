"""Ingest: manifests on the real NIH sets, a hostile folder, PHI, reproducibility."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from datetime import datetime
from pathlib import Path

import hostile
import numpy as np
import pandas as pd
import pytest

from audit.data.manifest import (
    MANIFEST_COLUMNS,
    REJECT_COLUMNS,
    box_problem,
    ingest,
    manifest_boxes,
    read_manifest,
)
from audit.data.nih import default_bbox_csv, read_bbox_csv
from audit.data.readers import read_image
from audit.store.files import atomic_write_bytes as write_atomic

DEV_COUNTS = {
    "Atelectasis": 85,
    "Cardiomegaly": 70,
    "Effusion": 81,
    "Infiltrate": 66,
    "Mass": 37,
    "Nodule": 44,
    "Pneumonia": 64,
    "Pneumothorax": 44,
}
RGBA_KEYS = {"00003400_003.png", "00011322_006.png", "00014223_009.png"}


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _rejects(result) -> pd.DataFrame:
    return pd.read_csv(result.rejects_csv, dtype=str, keep_default_na=False)


def _dev_ingest(dev: Path, out: Path, workers: int):
    return ingest(
        dev / "images",
        dev / "BBox_List_2017_dev.csv",
        dev / "Data_Entry_2017_dev.csv",
        name="nih_dev",
        out_dir=out,
        workers=workers,
        progress=False,
    )


@pytest.fixture(scope="module")
def dev(nih_dev_dir, tmp_path_factory):
    result = _dev_ingest(nih_dev_dir, tmp_path_factory.mktemp("dev"), workers=2)
    return result, read_manifest(result.manifest_csv), json.loads(result.json_path.read_text())


# ------------------------------------------------------------------------------------------
# The real NIH development set
# ------------------------------------------------------------------------------------------
def test_dev_set_gives_438_images_491_boxes_and_no_rejects(dev):
    result, df, sidecar = dev
    assert (result.n_images, result.n_boxes, result.n_rejects) == (438, 491, 0)
    assert df["image_key"].nunique() == 438 and len(manifest_boxes(df)) == 491 == len(df)
    assert _rejects(result).empty and list(_rejects(result).columns) == REJECT_COLUMNS
    assert (sidecar["n_images"], sidecar["n_boxes"], sidecar["n_rejects"]) == (438, 491, 0)


def test_dev_counts_per_finding_and_model_finding(dev):
    _, df, sidecar = dev
    assert df["finding"].value_counts().to_dict() == DEV_COUNTS
    assert sidecar["counts_per_finding"] == DEV_COUNTS
    model = {("Infiltration" if k == "Infiltrate" else k): v for k, v in DEV_COUNTS.items()}
    assert df["model_finding"].value_counts().to_dict() == model
    assert sidecar["counts_per_model_finding"] == model


def test_every_sha256_matches_the_published_sums(dev, nih_dev_dir):
    _, df, sidecar = dev
    sums = {}
    for line in (nih_dev_dir / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[Path(name).name] = digest
    assert len(sums) == 438
    assert dict(zip(df["image_key"], df["sha256"], strict=True)) == sums
    assert sidecar["images"] == sums


def test_rgba_nih_images_are_found_and_load_as_gray(dev, nih_dev_dir):
    _, df, sidecar = dev
    rgba = set(df.loc[df["photometric"] == "RGBA", "image_key"])
    assert rgba == RGBA_KEYS
    assert set(df["photometric"]) == {"L", "RGBA"}
    for key in rgba:
        image = read_image(nih_dev_dir / "images" / key)
        assert image.pixels.shape == (1024, 1024) and image.pixels.dtype == np.float32
        assert "alpha channel ignored" in sidecar["image_warnings"][key]


def test_manifest_rows_are_sorted_and_complete(dev):
    result, df, _ = dev
    assert list(df.columns) == MANIFEST_COLUMNS
    keys = list(zip(df["image_key"], df["finding"], df["box_index"], strict=True))
    assert keys == sorted(keys)
    assert (df["width"] == 1024).all() and (df["height"] == 1024).all()
    assert (df["path"] == df["image_key"]).all()  # relative to the images dir
    row = df[df["image_key"] == "00000211_010.png"].iloc[0]
    assert row["labels"] == "Atelectasis|Cardiomegaly|Effusion|Infiltration"
    # The coordinates are the CSV's, character for character.
    text = result.manifest_csv.read_text()
    assert ",225.084745762712,547.019216763771,86.7796610169491,79.1864406779661," in text
    assert "\r" not in text


def test_read_manifest_gives_proper_dtypes(dev):
    _, df, _ = dev
    for c in ("width", "height", "box_index"):
        assert str(df[c].dtype) == "Int64"
    for c in ("pixel_spacing", "box_x", "box_y", "box_w", "box_h"):
        assert df[c].dtype == np.float64
    assert df["pixel_spacing"].isna().all()  # PNGs carry no spacing
    assert isinstance(df["sha256"].iloc[0], str)


def test_json_sidecar_records_provenance(dev, nih_dev_dir):
    result, _, sidecar = dev
    assert sidecar["name"] == "nih_dev"
    assert sidecar["manifest_csv"]["sha256"] == _sha(result.manifest_csv)
    assert sidecar["rejects_csv"]["sha256"] == _sha(result.rejects_csv)
    boxes = sidecar["sources"]["bboxes_csv"]
    assert boxes["sha256"] == _sha(nih_dev_dir / "BBox_List_2017_dev.csv")
    assert Path(boxes["path"]) == (nih_dev_dir / "BBox_List_2017_dev.csv").resolve()
    labels = sidecar["sources"]["labels_csv"]
    assert labels["sha256"] == _sha(nih_dev_dir / "Data_Entry_2017_dev.csv")
    assert Path(sidecar["images_dir"]) == (nih_dev_dir / "images").resolve()
    assert datetime.fromisoformat(sidecar["created_utc"]).utcoffset().total_seconds() == 0
    assert sidecar["tool_version"] == "0.1.0"


def test_rerun_gives_a_byte_identical_manifest(dev, nih_dev_dir, tmp_path):
    first, _, sidecar = dev
    again = _dev_ingest(nih_dev_dir, tmp_path, workers=1)  # other worker count, same bytes
    assert again.manifest_csv.read_bytes() == first.manifest_csv.read_bytes()
    assert again.rejects_csv.read_bytes() == first.rejects_csv.read_bytes()
    assert json.loads(again.json_path.read_text())["manifest_csv"] == sidecar["manifest_csv"]


# ------------------------------------------------------------------------------------------
# Images without boxes, the default box list
# ------------------------------------------------------------------------------------------
def test_unboxed_images_get_one_row_each_with_empty_box_fields(nih_unboxed_dir, tmp_path):
    result = ingest(
        nih_unboxed_dir / "images",
        labels_csv=nih_unboxed_dir / "Data_Entry_2017_unboxed.csv",
        name="unboxed",
        out_dir=tmp_path,
        workers=1,
        progress=False,
    )
    df = read_manifest(result.manifest_csv)
    assert (result.n_images, result.n_boxes, result.n_rejects) == (22, 0, 0)
    assert len(df) == 22 and df["image_key"].is_unique
    box_cols = ["finding", "model_finding", "box_index", "box_x", "box_y", "box_w", "box_h"]
    assert df[box_cols].isna().all().all()
    assert df["labels"].notna().all()
    sidecar = json.loads(result.json_path.read_text())
    assert sidecar["sources"]["bboxes_csv"]["default_list"] is True
    assert sidecar["settings"]["missing_images"] == "ignore"
    assert sidecar["n_box_rows_ignored_missing_image"] == 984
    assert sidecar["n_images_without_boxes"] == 22


def test_default_list_on_a_subset_ignores_absent_images_unless_asked(nih_dev_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    keys = sorted(p.name for p in (nih_dev_dir / "images").glob("*.png"))[:6]
    for key in keys:
        os.symlink(nih_dev_dir / "images" / key, images / key)
    dev_boxes = read_bbox_csv(nih_dev_dir / "BBox_List_2017_dev.csv")
    n_boxes = int(dev_boxes["image_key"].isin(keys).sum())

    quiet = ingest(images, name="subset", out_dir=tmp_path / "a", workers=1, progress=False)
    assert (quiet.n_images, quiet.n_boxes, quiet.n_rejects) == (6, n_boxes, 0)
    ignored = json.loads(quiet.json_path.read_text())["n_box_rows_ignored_missing_image"]
    assert ignored == len(read_bbox_csv(default_bbox_csv())) - n_boxes

    loud = ingest(
        images, name="subset", out_dir=tmp_path / "b", workers=1, progress=False,
        missing_images="reject",
    )  # fmt: skip
    assert loud.n_rejects == ignored
    assert set(_rejects(loud)["reason"]) == {"listed in box CSV but missing on disk"}
    assert loud.manifest_csv.read_bytes() == quiet.manifest_csv.read_bytes()


# ------------------------------------------------------------------------------------------
# Hostile inputs
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("hostile")
    hs = hostile.build_hostile_folder(tmp_path / "in")
    result = ingest(
        hs.images_dir, hs.bbox_csv, name="hostile", out_dir=tmp_path / "out", workers=2,
        progress=False,
    )  # fmt: skip
    return hs, result


def test_hostile_folder_ingest_finishes_with_every_good_file_in_the_manifest(hostile_run):
    hs, result = hostile_run
    df = read_manifest(result.manifest_csv)
    assert set(df["image_key"]) == hs.accepted
    assert result.n_images == len(hs.accepted)
    assert df.loc[df["image_key"] == "1.2.826.0.1.3680043.10.1234.99", "path"].item() == (
        "sub/1.2.826.0.1.3680043.10.1234.99"
    )
    boxes = manifest_boxes(df)
    got = {
        (r.image_key, r.finding): (r.box_x, r.box_y, r.box_w, r.box_h) for r in boxes.itertuples()
    }
    assert got == hs.good_boxes
    # An image whose only box was refused stays, with one box-less row.
    for key in ("gray16.png", "la.png", "palette.png", "cr.dcm", "rgb.png"):
        rows = df[df["image_key"] == key]
        assert len(rows) == 1 and pd.isna(rows["finding"].item())


def test_hostile_folder_every_bad_input_is_rejected_with_its_reason(hostile_run):
    hs, result = hostile_run
    rejects = _rejects(result)
    pairs = zip(rejects["image_key"], rejects["finding"], strict=True)
    is_box = np.array([pair in hs.rejected_boxes for pair in pairs])
    files, boxes = rejects[~is_box], rejects[is_box]
    assert set(files["image_key"]) == set(hs.rejected_files)
    for row in files.itertuples():
        assert row.reason.startswith(hs.rejected_files[row.image_key]), row
    assert set(zip(boxes["image_key"], boxes["finding"], strict=True)) == set(hs.rejected_boxes)
    for row in boxes.itertuples():
        assert row.reason.startswith(hs.rejected_boxes[(row.image_key, row.finding)]), row
    missing = boxes[boxes["image_key"] == "missing.png"]
    assert missing["path"].tolist() == [""]
    listed = set(rejects["image_key"]) | set(read_manifest(result.manifest_csv)["image_key"])
    assert not listed & hs.skipped
    assert result.n_rejects == len(hs.rejected_files) + len(hs.rejected_boxes)


def test_hostile_folder_sidecar_counts(hostile_run):
    hs, result = hostile_run
    sidecar = json.loads(result.json_path.read_text())
    assert sidecar["n_files_skipped_not_images"] == len(hs.skipped)
    assert sidecar["n_box_rows_of_rejected_images"] == 1  # the box of truncated.png
    assert sidecar["rejects_by_reason"]["box outside image"] == 2
    assert sidecar["rejects_by_reason"]["non-positive box size"] == 2
    assert (
        "multi-frame DICOM (3 frames): frame 0 used" in sidecar["image_warnings"]["multiframe.dcm"]
    )
    assert set(sidecar["images"]) == hs.accepted


def test_box_validation_allows_one_pixel_of_rounding():
    assert box_problem(-1.0, 0, 10, 10, 48, 64) is None
    assert box_problem(0, 0, 49.0, 65.0, 48, 64) is None
    assert box_problem(-1.01, 0, 10, 10, 48, 64).startswith("box outside image")
    assert box_problem(40, 0, 9.01, 10, 48, 64).startswith("box outside image")
    assert box_problem(0, 0, 0, 10, 48, 64).startswith("non-positive box size")
    assert box_problem(0, 0, float("nan"), 10, 48, 64).startswith("malformed box row")


# ------------------------------------------------------------------------------------------
# PHI
# ------------------------------------------------------------------------------------------
def test_phi_sentinel_appears_in_no_output_file_or_log(tmp_path, caplog, capfd):
    images = tmp_path / "images"
    images.mkdir()
    hostile.write_phi_dicom(images / "phi.dcm")
    hostile.write_phi_dicom(images / "phi_sr.dcm", sop_class=hostile.BASIC_TEXT_SR)
    data = (images / "phi.dcm").read_bytes()
    (images / "phi_truncated.dcm").write_bytes(data[: len(data) - 300])
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(
        hostile.BBOX_HEADER + "phi.dcm,Mass,1.0,2.0,10.0,10.0\nphi_sr.dcm,Mass,1.0,2.0,3.0,4.0\n"
    )
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        result = ingest(images, boxes, name="phi", out_dir=out, workers=2, progress=True)
    assert (result.n_images, result.n_boxes, result.n_rejects) == (1, 1, 2)
    written = sorted(out.iterdir())
    assert {p.name for p in written} == {"phi.csv", "phi.rejects.csv", "phi.json"}
    for path in written:
        assert hostile.SENTINEL_BYTES not in path.read_bytes(), path.name
    assert "SENTINEL" not in caplog.text
    stdout, stderr = capfd.readouterr()  # includes the workers' inherited stderr
    assert "SENTINEL" not in stdout + stderr


# ------------------------------------------------------------------------------------------
# Files and arguments
# ------------------------------------------------------------------------------------------
def test_atomic_write_replaces_and_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "x.csv"
    target.write_text("old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["x.csv"]


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="invalid manifest name"):
        ingest(tmp_path, name="../escape", out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="missing_images"):
        ingest(tmp_path, name="x", out_dir=tmp_path, missing_images="maybe", progress=False)
    with pytest.raises(NotADirectoryError):
        ingest(tmp_path / "absent", name="x", out_dir=tmp_path, progress=False)


class _FakePool:
    """Stands in for ProcessPoolExecutor: runs in-process; 'crash*' files break the pool."""

    broken_at_start = False

    def __init__(self, max_workers=None, mp_context=None):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        from concurrent.futures import Future
        from concurrent.futures.process import BrokenProcessPool

        fut = Future()
        if self.broken_at_start or (fn is not abs and Path(args[0]).name.startswith("crash")):
            fut.set_exception(BrokenProcessPool("worker died"))
        else:
            fut.set_result(fn(*args))
        return fut

    def map(self, fn, paths, chunksize=1):
        for path in paths:
            yield self.submit(fn, path).result()


def _two_good_one_crash(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    hostile.png_gray8(images / "a.png")
    hostile.png_rgba(images / "b.png")
    hostile.png_gray8(images / "crash.png")
    return images


def test_a_file_that_kills_its_worker_is_rejected_alone(tmp_path, monkeypatch):
    monkeypatch.setattr("audit.data.manifest.ProcessPoolExecutor", _FakePool)
    images = _two_good_one_crash(tmp_path)
    result = ingest(images, name="x", out_dir=tmp_path / "out", workers=2, progress=False)
    assert (result.n_images, result.n_rejects) == (2, 1)
    assert _rejects(result)["reason"].tolist() == [
        "decoder crashed: the worker process died on this file"
    ]


def test_workers_that_cannot_start_fall_back_to_reading_in_process(tmp_path, monkeypatch):
    monkeypatch.setattr("audit.data.manifest.ProcessPoolExecutor", _FakePool)
    monkeypatch.setattr(_FakePool, "broken_at_start", True)
    images = _two_good_one_crash(tmp_path)
    result = ingest(images, name="x", out_dir=tmp_path / "out", workers=2, progress=False)
    assert (result.n_images, result.n_rejects) == (3, 0)
