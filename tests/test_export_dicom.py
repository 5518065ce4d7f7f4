"""`cxr-audit export-dicom`: each saved map of a DICOM source becomes a DICOM Parametric Map that
pydicom reads back, whose values are the run's saved map (exactly, sampled at the centre of
each map pixel's block), that references the source's study, series and image, and that holds
no patient or study identifier unless `--keep-identifiers`; on the demo's phantom DICOMs and
on the real DICOMs of ../shared/data/dicom."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import ParametricMapStorage
from typer.testing import CliRunner

from audit.cli import app
from audit.export.dicom_maps import block_centres, export_run
from audit.model import load_model
from audit.store.rundir import SavedMaps
from tests.run_fixtures import TinyRun, build_run, demo_set_with_dicoms

pytestmark = pytest.mark.slow  # builds finished runs and exports them: CI runs it

#: Identifiers planted in one source DICOM: none may reach a default export.
PLANTED = {"PatientName": "Sentinel^Planted", "PatientID": "SENTINEL-ID-4711",
           "PatientBirthDate": "19450508", "AccessionNumber": "ACC-SENTINEL",
           "StudyDate": "20200102", "ReferringPhysicianName": "Doctor^Sentinel",
           "StudyID": "SENTSTUDY"}


@pytest.fixture(scope="module")
def honest_model():
    """The demo's honest reference model (its maps are not flat, unlike a random network's)."""
    from flows.demo import reference_models

    torch.set_num_threads(1)
    return load_model(checkpoint=reference_models()["honest"]["checkpoint"], device="cpu")


@pytest.fixture(scope="module")
def phantom_run(honest_model, tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """Five images of the demo's phantom set, the first four as DICOMs with planted identifiers;
    Grad-CAM and Grad-CAM++ maps saved."""
    root = tmp_path_factory.mktemp("export")
    images, boxes = demo_set_with_dicoms(root, n_images=5, n_dicom=4)
    for path in (images / "dicom").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        for keyword, value in PLANTED.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
    return build_run(honest_model, images, boxes, root, methods=("gradcam", "gradcampp"))


def _saved(run_dir: Path) -> dict[tuple[str, str, str], np.ndarray]:
    maps = SavedMaps(run_dir / "maps")
    return {(key, finding, method): value for method in ("gradcam", "gradcampp")
            for key, finding, value in maps.all(method)}


def _source(run: TinyRun, image_key: str) -> pydicom.Dataset:
    return pydicom.dcmread(next(run.images_dir.rglob(image_key)))


def _check_round_trip(run: TinyRun, out: Path) -> int:
    """Every saved map of a DICOM source: one map that reads back with the saved values and
    the source's UIDs. Returns how many were checked."""
    result = export_run(run.run_dir, out)
    saved = _saved(run.run_dir)
    by_key = {(m.image_key, m.finding, m.method): m for m in result.written}
    dicom_keys = {k for k in saved if k[0].endswith(".dcm")}
    assert set(by_key) == dicom_keys and dicom_keys
    for key, item in by_key.items():
        pm, source = pydicom.dcmread(item.path), _source(run, key[0])
        assert pm.SOPClassUID == ParametricMapStorage and pm.SOPInstanceUID == item.sop_instance_uid
        values = pm.pixel_array
        assert values.dtype == np.float32 and values.shape == (source.Rows, source.Columns)
        expected = saved[key].astype(np.float32)
        rows = block_centres(expected.shape[0], int(source.Rows))
        cols = block_centres(expected.shape[1], int(source.Columns))
        np.testing.assert_array_equal(values[np.ix_(rows, cols)], expected)  # exact
        r, c = int(source.Rows) - 1, int(source.Columns) - 1  # the last pixel: the last block
        assert values[r, c] == expected[-1, -1] and values[0, 0] == expected[0, 0]
        assert len(np.unique(values)) == len(np.unique(expected))  # blocks: no new values
        assert pm.StudyInstanceUID == source.StudyInstanceUID
        assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
        referenced = pm.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
        assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
        derivation = pm.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
        assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == \
            source.SOPInstanceUID
        assert pm.SeriesInstanceUID != source.SeriesInstanceUID
    return len(by_key)


def test_every_saved_map_of_a_dicom_round_trips(phantom_run: TinyRun, tmp_path: Path) -> None:
    n = _check_round_trip(phantom_run, tmp_path / "maps")
    saved = _saved(phantom_run.run_dir)
    assert any(np.ptp(v) > 0 for v in saved.values())  # not a flat map: the test can fail
    assert n >= 4


def test_png_sources_are_skipped_with_the_reason(phantom_run: TinyRun, tmp_path: Path) -> None:
    result = export_run(phantom_run.run_dir, tmp_path / "maps")
    reasons = {key: reason for key, reason in result.skipped}
    assert reasons and all(key.endswith(".png") for key in reasons)
    assert set(reasons.values()) == {"not a DICOM (png)"}


def test_highdicom_reads_its_map_back(phantom_run: TinyRun, tmp_path: Path) -> None:
    import highdicom as hd

    item = export_run(phantom_run.run_dir, tmp_path / "maps").written[0]
    pm = hd.imread(item.path)  # highdicom re-checks its dimension indices here
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.LUTLabel == item.method
    values = pydicom.dcmread(item.path).pixel_array
    assert mapping.DoubleFloatRealWorldValueFirstValueMapped == pytest.approx(values.min())
    assert mapping.DoubleFloatRealWorldValueLastValueMapped == pytest.approx(values.max())


def test_no_identifier_is_copied_unless_asked(phantom_run: TinyRun, tmp_path: Path) -> None:
    default = export_run(phantom_run.run_dir, tmp_path / "default").written
    kept = export_run(phantom_run.run_dir, tmp_path / "kept", keep_identifiers=True).written
    source = _source(phantom_run, default[0].image_key)
    assert str(source.PatientName) == PLANTED["PatientName"]  # the plant took
    for item in default:
        data = item.path.read_bytes()
        for value in PLANTED.values():
            assert value.encode() not in data, (item.path.name, value)
        pm = pydicom.dcmread(item.path)
        assert pm.PatientIdentityRemoved == "YES" and str(pm.PatientName) == ""
    assert len(kept) == len(default) > 0
    for item in kept:
        pm = pydicom.dcmread(item.path)
        assert str(pm.PatientName) == PLANTED["PatientName"]
        assert pm.PatientID == PLANTED["PatientID"]
        assert pm.AccessionNumber == PLANTED["AccessionNumber"]


def test_cli_writes_and_says_what_it_skipped(phantom_run: TinyRun, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export-dicom", str(phantom_run.run_dir), "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    wrote = [line for line in result.output.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == len(list((tmp_path / "out").glob("*.dcm"))) > 0
    assert "skipped phantom_00005_000.png: not a DICOM (png)" in result.output


def test_a_run_without_saved_maps_exits_2(phantom_run: TinyRun, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(phantom_run.run_dir, tmp_path / "run"))
    shutil.rmtree(copy / "maps")
    result = CliRunner().invoke(app, ["export-dicom", str(copy), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "saved no maps" in result.output


def test_real_dicoms_round_trip(honest_model, dicom_dir: Path, tmp_path: Path) -> None:
    """The five real chest DICOMs (uncompressed, JPEG, JPEG 2000, JPEG-LS; MONOCHROME1 and 2;
    1024 x 1024 and 1955 x 1841), one box each."""
    images = sorted(p for p in dicom_dir.glob("*.dcm"))
    assert len(images) == 5
    bboxes = tmp_path / "boxes.csv"
    with open(bboxes, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", ""])
        for path in images:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            writer.writerow([path.name, "Mass", ds.Columns // 4, ds.Rows // 4, ds.Columns // 3,
                             ds.Rows // 3, ""])
    run = build_run(honest_model, dicom_dir, bboxes, tmp_path / "run")
    assert _check_round_trip(run, tmp_path / "maps") == 5
