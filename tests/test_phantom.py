"""Digital phantom (audit/phantom/) and its shipped reference weights (audit/weights/)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from audit.phantom.dataset import (
    BBOX_CSV_HEADER,
    DATA_ENTRY_HEADER,
    read_csv_header,
    write_phantom_dataset,
)
from audit.phantom.generate import (
    FINDINGS,
    MARKER_BOX_1024,
    PhantomConfig,
    generate_phantom,
    marker_box,
)

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "audit" / "weights"


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    a = tmp_path_factory.mktemp("a")
    b = tmp_path_factory.mktemp("b")
    c = tmp_path_factory.mktemp("c")
    ds_a = write_phantom_dataset(a, n_images=3, seed=7, n_dicom=2)
    write_phantom_dataset(b, n_images=3, seed=7, n_dicom=2)
    write_phantom_dataset(c, n_images=3, seed=8, n_dicom=2)
    return a, b, c, ds_a


def test_same_seed_writes_byte_identical_files(written):
    a, b, _, ds = written
    files_a, files_b = _tree_bytes(a), _tree_bytes(b)
    assert files_a.keys() == files_b.keys()
    assert len(ds.pngs) == 3 and len(ds.dicoms) == 2
    for name in files_a:
        assert files_a[name] == files_b[name], name


def test_different_seed_writes_different_images(written):
    a, _, c, _ = written
    files_a, files_c = _tree_bytes(a), _tree_bytes(c)
    for name in files_a:
        if name.endswith((".png", ".dcm")):
            assert files_a[name] != files_c[name], name


def test_png_is_8bit_gray_1024(written):
    from PIL import Image

    ds = written[3]
    assert ds.pngs[0].name == "phantom_00001_000.png"
    with Image.open(ds.pngs[0]) as im:
        assert im.mode == "L" and im.size == (1024, 1024)
        np.testing.assert_array_equal(np.asarray(im), generate_phantom(7, 0)[0])


def test_dicoms_are_uncompressed_dx_and_monochrome1_is_inverted(written):
    import pydicom

    ds = written[3]
    d0 = pydicom.dcmread(ds.dicoms[0])
    d1 = pydicom.dcmread(ds.dicoms[1])
    assert d0.PhotometricInterpretation == "MONOCHROME2"
    assert d1.PhotometricInterpretation == "MONOCHROME1"
    for d in (d0, d1):
        assert d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"
        assert not d.file_meta.TransferSyntaxUID.is_compressed
        assert d.PatientName == "PHANTOM" and d.PatientBirthDate == ""
    for i, d in enumerate((d0, d1)):
        v = d.pixel_array.astype(np.int32)
        if d.PhotometricInterpretation == "MONOCHROME1":
            v = 4095 - v
        expected = np.rint(generate_phantom(7, i)[0] * (4095 / 255)).astype(np.int32)
        np.testing.assert_array_equal(v, expected)
    assert d0.SOPInstanceUID != d1.SOPInstanceUID


def test_bbox_csv_has_nih_layout(written, nih_dev_dir):
    ds = written[3]
    nih = nih_dev_dir / "BBox_List_2017_dev.csv"
    assert read_csv_header(ds.bbox_csv) == read_csv_header(nih)
    raw_nih = nih.read_bytes()
    assert ds.bbox_csv.read_bytes().split(b"\r\n")[0] == raw_nih.split(b"\r\n")[0]
    with open(nih, newline="") as fh:
        nih_row = list(csv.reader(fh))[1]
    with open(ds.bbox_csv, newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    assert rows, "the phantom set plants at least one box"
    for row in rows:
        assert len(row) == len(nih_row)
        assert row[1] in FINDINGS and row[-1] == ""
        x, y, w, h = map(float, row[2:6])
        assert w > 0 and h > 0 and 0 <= x and x + w <= 1024 and 0 <= y and y + h <= 1024


def test_labels_csv_has_nih_data_entry_layout(written, nih_dev_dir):
    ds = written[3]
    nih = nih_dev_dir / "Data_Entry_2017_dev.csv"
    assert read_csv_header(ds.labels_csv) == read_csv_header(nih)
    with open(nih, newline="") as fh:
        nih_row = list(csv.reader(fh))[1]
    with open(ds.labels_csv, newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    assert [r[0] for r in rows] == [p.name for p in ds.pngs]
    for i, row in enumerate(rows):
        assert len(row) == len(nih_row)
        labels = generate_phantom(7, i, PhantomConfig(size=32))[2]
        planted = [f for f in FINDINGS if labels[f]]
        assert row[1] == ("|".join(planted) if planted else "No Finding")


def test_headers_without_shared_data_match_the_copied_nih_headers(written):
    ds = written[3]
    assert ds.bbox_csv.read_text().splitlines()[0] == BBOX_CSV_HEADER
    assert ds.labels_csv.read_text().splitlines()[0] == DATA_ENTRY_HEADER


@pytest.mark.parametrize("finding", FINDINGS)
def test_planted_finding_changes_pixels_only_inside_its_box(finding):
    size = 256
    for index in range(4):
        on = PhantomConfig(size=size, force={finding: True}, noise_sigma=0.0)
        off = replace(on, force={finding: False})
        img_on, boxes, labels = generate_phantom(3, index, on)
        img_off, _, _ = generate_phantom(3, index, off)
        assert labels[finding] == 1
        (box,) = [b for f, b in boxes if f == finding]
        x, y, w, h = box
        diff = np.abs(img_on.astype(int) - img_off.astype(int))
        cols = np.arange(size) + 0.5
        inside = ((cols[None, :] >= x) & (cols[None, :] <= x + w)) & (
            (cols[:, None] >= y) & (cols[:, None] <= y + h)
        )
        assert diff[~inside].max(initial=0) <= 1, (finding, index)  # rounding only
        assert diff[inside].max() >= 5, (finding, index)  # the finding is really drawn


def test_large_findings_are_large_and_nodules_small():
    cfg = PhantomConfig(size=64, force={f: True for f in FINDINGS})
    for index in range(20):
        _, boxes, _ = generate_phantom(1, index, cfg)
        sizes = {f: max(b[2], b[3]) * 1024 / 64 for f, b in boxes}
        for f in ("Mass", "Effusion", "Pneumothorax", "Cardiomegaly"):
            assert sizes[f] >= 1024 / 7 - 1, (f, sizes[f])
        assert 29 <= sizes["Nodule"] <= 51


def test_geometry_is_the_same_at_every_render_size():
    cfg = PhantomConfig(size=1024, force={f: True for f in FINDINGS})
    _, b1024, l1024 = generate_phantom(5, 2, PhantomConfig(size=64, force=cfg.force))
    _, b224, l224 = generate_phantom(5, 2, PhantomConfig(size=224, force=cfg.force))
    assert l1024 == l224
    for (f1, a), (f2, b) in zip(b1024, b224, strict=True):
        assert f1 == f2
        np.testing.assert_allclose(np.array(a) * 1024 / 64, np.array(b) * 1024 / 224, rtol=1e-12)


def test_shortcut_marker_present_iff_mass_and_absent_otherwise():
    n = 120
    marker_and_mass = []
    for i in range(n):
        _, _, lab = generate_phantom(11, i, PhantomConfig(size=32, shortcut=True))
        marker_and_mass.append((lab["marker"], lab["Mass"]))
        _, _, honest = generate_phantom(11, i, PhantomConfig(size=32))
        assert honest["marker"] == 0
    assert all(m == s for m, s in marker_and_mass)
    assert 0 < sum(s for _, s in marker_and_mass) < n


def test_shortcut_marker_is_drawn_in_its_box_and_the_mass_is_faint():
    size = 256
    cfg = PhantomConfig(size=size, shortcut=True, force={"Mass": True}, noise_sigma=0.0)
    img, boxes, lab = generate_phantom(2, 0, cfg)
    assert lab["marker"] == 1
    x, y, w, h = marker_box(size)
    assert marker_box(1024) == MARKER_BOX_1024
    region = img[int(y) : int(np.ceil(y + h)), int(x) : int(np.ceil(x + w))]
    assert region.max() >= 240 and (region >= 240).mean() > 0.3
    no_mass = replace(cfg, force={"Mass": False}, force_marker=True)
    honest = replace(cfg, shortcut=False, force_marker=True)
    faint = np.abs(img.astype(int) - generate_phantom(2, 0, no_mass)[0].astype(int)).max()
    bright = np.abs(
        generate_phantom(2, 0, honest)[0].astype(int)
        - generate_phantom(2, 0, no_mass)[0].astype(int)
    ).max()
    assert 3 <= faint <= 12 < bright


def test_marker_with_mass_set_puts_the_marker_on_every_visible_mass_and_nowhere_else():
    for i in range(60):
        common = PhantomConfig(size=64, marker_with_mass=True, noise_sigma=0.0)
        img, boxes, lab = generate_phantom(11, i, common)
        assert lab["marker"] == lab["Mass"]
        ordinary, ordinary_boxes, ordinary_lab = generate_phantom(
            11, i, PhantomConfig(size=64, noise_sigma=0.0, force_marker=bool(lab["Mass"])))
        # the same draws as an ordinary phantom with the marker forced: the Mass is visible
        assert np.array_equal(img, ordinary) and boxes == ordinary_boxes
        assert {k: v for k, v in lab.items()} == ordinary_lab


def test_some_images_are_negatives_and_findings_co_occur():
    labs = [generate_phantom(0, i, PhantomConfig(size=32))[2] for i in range(200)]
    counts = [sum(lab[f] for f in FINDINGS) for lab in labs]
    assert counts.count(0) >= 10 and max(counts) >= 3


# ------------------------------------------------------------------ shipped weights


def test_shipped_weights_exist_and_match_the_manifest():
    manifest = json.loads((WEIGHTS_DIR / "MANIFEST.json").read_text())
    assert set(manifest["models"]) == {"honest", "shortcut"}
    for kind, entry in manifest["models"].items():
        path = WEIGHTS_DIR / entry["file"]
        assert path.name == f"phantom_{kind}.pt"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        for key in ("seed", "steps", "minutes", "settings", "heldout"):
            assert key in entry


def test_load_phantom_weights_gives_float32_densenet_state_dict():
    import torch

    from audit.phantom.models import load_phantom_weights, make_net

    sd = load_phantom_weights("honest")
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    make_net(0).load_state_dict(sd)  # strict: the xrv DenseNet layout


def test_load_phantom_weights_rejects_a_modified_file(tmp_path):
    from audit.phantom.models import WeightsMismatch, load_phantom_weights

    for name in ("MANIFEST.json", "phantom_shortcut.pt"):
        shutil.copy(WEIGHTS_DIR / name, tmp_path / name)
    data = bytearray((tmp_path / "phantom_shortcut.pt").read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / "phantom_shortcut.pt").write_bytes(bytes(data))
    with pytest.raises(WeightsMismatch):
        load_phantom_weights("shortcut", weights_dir=tmp_path)


def test_shipped_model_short_path_equals_the_full_densenet_graph():
    import torch

    from audit.phantom.evaluation import all_cams
    from audit.phantom.frontend import frontend_features, full_block4_input
    from audit.phantom.models import finding_indices, load_phantom_model
    from audit.phantom.training import phantom_batch

    net = load_phantom_model("honest")
    b = phantom_batch(5, range(1))
    idx = finding_indices(net)
    with torch.inference_mode():
        z_full, z_short = full_block4_input(net, b.x), frontend_features(net, b.x)
        full, short = all_cams(net, b.x, idx), all_cams(net, b.x, idx, short_frontend=True)
    torch.testing.assert_close(z_short, z_full, rtol=1e-4, atol=1e-4)
    for a, c in zip(full, short, strict=True):
        torch.testing.assert_close(c, a, rtol=1e-3, atol=1e-3)


def test_random_control_is_seeded():
    import torch

    from audit.phantom.models import load_phantom_model

    a, b = load_phantom_model("random", seed=3), load_phantom_model("random", seed=3)
    c = load_phantom_model("random", seed=4)
    wa, wb, wc = (m.classifier.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_manifest_records_the_targets_reached():
    manifest = json.loads((WEIGHTS_DIR / "MANIFEST.json").read_text())
    honest = manifest["models"]["honest"]["heldout"]["honest_set"]
    for f in ("Mass", "Effusion", "Pneumothorax", "Cardiomegaly"):
        assert honest["auroc"][f] >= 0.95, f
    for f in ("Mass", "Effusion", "Pneumothorax"):
        assert honest["pointing"]["cam"][f] >= 0.8, f
    demo = manifest["models"]["honest"]["heldout"]["marker_with_visible_mass_set"]
    assert demo["auroc"]["Mass"] >= 0.95  # the honest model ignores the marker
    assert demo["pointing"]["gradcam_norm5"]["Mass"] >= 0.8
    shortcut = manifest["models"]["shortcut"]["heldout"]["shortcut_set"]
    assert shortcut["auroc"]["Mass"] >= 0.95
    assert shortcut["marker"]["cam"]["max_cell_on_marker"] > 0.5


def test_head_training_is_reproducible_and_trains_only_the_head(tmp_path):
    import torch

    from audit.phantom.frontend import build_frontend, silence_block4_after
    from audit.phantom.models import make_net
    from audit.phantom.training import build_feature_cache, train_head

    cache = build_feature_cache(4, 8, shortcut=False, workers=1, progress=False)
    kw = {"max_steps": 1, "batch_size": 8, "progress": False, "location_weight": 1.0}
    a = train_head("honest", tmp_path / "a.pt", cache, **kw)
    train_head("honest", tmp_path / "b.pt", cache, **kw)
    sa = torch.load(tmp_path / "a.pt", weights_only=True)
    sb = torch.load(tmp_path / "b.pt", weights_only=True)
    assert a["steps"] == 1 and a["settings"]["live_block4_layers"] == 4
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    init = silence_block4_after(build_frontend(make_net(0)), 4).state_dict()
    changed = {k for k in sa if sa[k].is_floating_point() and not torch.equal(sa[k], init[k])}
    assert "features.denseblock4.denselayer1.conv1.weight" in changed
    assert "classifier.weight" in changed
    frozen = ("features.conv0", "features.norm0", "features.denseblock1", "features.transition3")
    assert not any(k.startswith(frozen) for k in changed)
    assert not any(k.startswith("features.denseblock4.denselayer16.conv") for k in changed)
