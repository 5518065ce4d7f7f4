"""Baselines: random (seeded), centre prior, average expert box (development half only)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from audit.saliency import BASELINE_NAMES, get_method
from audit.saliency.baselines import DEFAULT_AVERAGE_BOX_TABLE, box_indicator

REPO = Path(__file__).resolve().parents[1]



class _Names:
    """A stand-in for AuditModel: baselines only need ``device`` and ``pathologies``."""

    device = torch.device("cpu")
    pathologies = ["Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema",
                   "Emphysema", "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening",
                   "Cardiomegaly", "Nodule", "Mass", "Hernia", "", "", "", ""]


MODEL = _Names()
X = torch.zeros((3, 1, 32, 40))
TARGETS = torch.tensor([[7, 10], [2, 7], [11, 12]])


def test_every_baseline_gives_non_negative_maps_of_the_input_size():
    for name in BASELINE_NAMES:
        res = get_method(name).explain(MODEL, X, TARGETS)
        assert res.maps.shape == (3, 2, 32, 40) and res.maps.dtype == torch.float32
        assert (res.maps >= 0).all() and torch.isfinite(res.maps).all()
        assert get_method(name).kind == "baseline"


def test_random_maps_depend_only_on_seed_image_index_and_target():
    a = get_method("random", seed=1).explain(MODEL, X, TARGETS).maps
    b = get_method("random", seed=1).explain(MODEL, X, TARGETS).maps
    assert torch.equal(a, b)
    assert (a >= 0).all() and (a < 1).all()
    assert not torch.equal(a, get_method("random", seed=2).explain(MODEL, X, TARGETS).maps)
    assert not torch.equal(a[0, 0], a[1, 1])  # same target (7), another image
    # the same image index in a later batch (start_index) gives the same map
    tail = get_method("random", seed=1, random_start_index=2).explain(MODEL, X[2:], TARGETS[2:])
    assert torch.equal(tail.maps[0], a[2])


def test_centre_prior_peaks_at_the_centre_and_is_symmetric():
    m = get_method("centre_prior", sigma_fraction=0.2).explain(MODEL, X, TARGETS).maps[0, 0]
    assert m.shape == (32, 40)
    r, c = divmod(int(m.argmax()), 40)
    assert (r, c) in {(15, 19), (15, 20), (16, 19), (16, 20)}
    assert torch.allclose(m, m.flip(0)) and torch.allclose(m, m.flip(1))
    assert m.max() <= 1.0


def test_box_indicator_uses_pixel_centres_inside_the_closed_box():
    m = box_indicator((1.5, 0.0, 2.0, 1.0), 3, 6)
    # centres 0.5..5.5: columns with 1.5 <= c+0.5 <= 3.5 -> c = 1, 2, 3; rows 0 only
    assert m.tolist() == [[0, 1, 1, 1, 0, 0], [0] * 6, [0] * 6]


def test_average_box_maps_are_the_scaled_table_box_of_the_finding():
    table = json.loads(DEFAULT_AVERAGE_BOX_TABLE.read_text())
    res = get_method("average_box").explain(MODEL, X, TARGETS)
    box = table["boxes"]["Effusion"]
    expected = box_indicator((box["x"] * 40 / 1024, box["y"] * 32 / 1024,
                              box["w"] * 40 / 1024, box["h"] * 32 / 1024), 32, 40)
    assert torch.equal(res.maps[0, 0], expected) and torch.equal(res.maps[1, 1], expected)
    infiltrate = table["boxes"]["Infiltration"]
    assert infiltrate["nih_name"] == "Infiltrate"
    assert res.maps[1, 0].sum() > 0


def test_average_box_accepts_a_custom_table_and_refuses_findings_it_lacks(tmp_path):
    custom = {"Effusion": {"x": 0, "y": 0, "w": 512, "h": 1024}}
    res = get_method("average_box", table=custom).explain(MODEL, X[:1], torch.tensor([[7]]))
    assert res.maps[0, 0, :, :20].min() == 1 and res.maps[0, 0, :, 20:].max() == 0
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"frame": {"width": 100, "height": 100},
                                "boxes": {"Mass": {"x": 50, "y": 50, "w": 50, "h": 50}}}))
    res = get_method("average_box", average_box_table=str(path)).explain(
        MODEL, X[:1], torch.tensor([[12]]))
    assert res.maps[0, 0, 16:, 20:].min() == 1 and res.maps[0, 0, :16].max() == 0
    assert res.maps[0, 0, :, :20].max() == 0
    with pytest.raises(ValueError, match="Edema"):
        get_method("average_box", table=custom).explain(MODEL, X[:1], torch.tensor([[4]]))


def test_average_box_table_comes_from_the_development_half_with_provenance(nih_dev_dir, tmp_path):
    table = json.loads(DEFAULT_AVERAGE_BOX_TABLE.read_text())
    csv_path = nih_dev_dir / "BBox_List_2017_dev.csv"
    assert table["source"]["file"] == csv_path.name
    assert table["source"]["sha256"] == hashlib.sha256(csv_path.read_bytes()).hexdigest()
    counts = {k: v["n"] for k, v in table["boxes"].items()}
    assert counts == {"Atelectasis": 85, "Cardiomegaly": 70, "Effusion": 81, "Infiltration": 66,
                      "Mass": 37, "Nodule": 44, "Pneumonia": 64, "Pneumothorax": 44}
    assert sum(counts.values()) == table["source"]["n_boxes"] == 491
    # the script reproduces the packaged table exactly
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_average_boxes",
                                                  REPO / "scripts" / "make_average_boxes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "boxes.json"
    assert mod.main(["--bbox-csv", str(csv_path), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == table
