"""Known answers for what the report adds beside the run's scores: the grid's IoU ceiling, the
chance pointing rate, AUROC, the gallery's map store and overlay, the small-n formatting, the
provenance text and the mode of report files."""

from __future__ import annotations

import math
import os
import stat

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from report_fixtures import build_run_dir

from audit.report import render_report
from audit.report.format import p_value, timestamp, with_count
from audit.report.overlay import (
    BAR_MARGIN,
    BAR_PANEL,
    EXPERT_COLOUR,
    PEAK_COLOUR,
    colour_lut,
    overlay_image,
)
from audit.report.pathology_context import (
    auroc,
    best_grid_iou,
    box_geometry,
    chance_pointing_share,
    map_warnings,
)
from audit.report.provenance import provenance
from audit.store.files import atomic_write_text, plain_file_mode, write_npz
from audit.store.gallery_maps import (
    GalleryMaps,
    display_map,
    gallery_entry,
    gallery_map_key,
    keep_gallery_maps,
    map_peak,
)
from audit.store.rundir import GALLERY_MAPS

CELL_1024 = 1024 / 7  # px per cell of a 7 x 7 grid on the 1024 frame


# ---- the grid's IoU ceiling, chance, AUROC --------------------------------------------------


def test_grid_ceiling_of_the_median_nodule_box_is_about_0_19():
    # issue 16: a 66 x 63 px box inside one ~146 px cell: IoU = 66 * 63 / 146.29^2
    assert best_grid_iou(66, 63, CELL_1024) == pytest.approx(66 * 63 / CELL_1024 ** 2)
    assert best_grid_iou(66, 63, CELL_1024) == pytest.approx(0.1943, abs=1e-4)
    assert best_grid_iou(CELL_1024, CELL_1024, CELL_1024) == pytest.approx(1.0)
    assert best_grid_iou(2 * CELL_1024, CELL_1024, CELL_1024) == pytest.approx(1.0)
    # half a cell wide: 0.5; 1.5 cells wide: one cell gives 1/1.5, two cells 1.5/2 -> 0.75
    assert best_grid_iou(CELL_1024 / 2, CELL_1024, CELL_1024) == pytest.approx(0.5)
    assert best_grid_iou(1.5 * CELL_1024, CELL_1024, CELL_1024) == pytest.approx(0.75)
    assert math.isnan(best_grid_iou(0, 10, CELL_1024))


def test_chance_pointing_share_is_the_widened_box_area_share():
    # a 100 x 50 box on a 1000 px image, 1000 x 1000 grid (one centre per px): no tolerance
    # -> 5000 / 1e6; tolerance 10 -> (100*50 + 2*10*(100+50) + pi*100) / 1e6
    assert chance_pointing_share([(200, 300, 100, 50)], 1000, 1000, 0.0, 1000) == \
        pytest.approx(0.005, abs=1e-4)
    want = (100 * 50 + 2 * 10 * 150 + math.pi * 100) / 1e6
    assert chance_pointing_share([(200, 300, 100, 50)], 1000, 1000, 10.0, 1000) == \
        pytest.approx(want, rel=0.01)
    # two overlapping boxes count their union once
    assert chance_pointing_share([(0, 0, 100, 100), (50, 0, 100, 100)], 1000, 1000, 0.0,
                                 1000) == pytest.approx(0.015, abs=1e-4)


def test_auroc_known_answers():
    assert auroc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert auroc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert auroc([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]) == 0.5  # ties count half
    assert auroc([1, 0, 1, 0], [0.9, 0.8, 0.3, 0.1]) == 0.75
    assert math.isnan(auroc([1, 1], [0.2, 0.3]))


def test_box_geometry_and_map_warnings_of_a_known_pathology():
    rows = []
    for i, (w, h) in enumerate([(66, 63), (60, 60), (80, 70)]):
        for m, pred in (("gradcam", (0, 0, 1024, 1000)), ("gradcampp", (10, 10, 50, 50))):
            rows.append({"image_key": f"i{i}", "model_finding": "Nodule", "box_index": 0,
                         "width": 1024.0, "height": 1024.0, "box_x": 100.0, "box_y": 100.0,
                         "box_w": float(w), "box_h": float(h), "method": m,
                         "pred_x": pred[0], "pred_y": pred[1], "pred_w": pred[2],
                         "pred_h": pred[3], "status": "ok" if m == "gradcam" or i else "empty"})
    b = pd.DataFrame(rows)
    g = box_geometry(b, 224)
    assert (g["median_w"], g["median_h"], g["grid"]) == (66.0, 63.0, 7)
    assert g["ceiling"] == pytest.approx(0.1943, abs=1e-4)
    share = [(w + 30) * (h + 30) / 1024 ** 2 for w, h in [(66, 63), (60, 60), (80, 70)]]
    assert g["chance"] == pytest.approx(np.mean(share), rel=0.1)  # 224 px grid, round corners
    warn = {w["method"]: w for w in map_warnings(b, ["gradcam", "gradcampp", "random"])}
    assert set(warn) == {"gradcam", "gradcampp"}  # a baseline is never warned about
    assert (warn["gradcam"]["whole"], warn["gradcam"]["warn_whole"]) == (3, True)
    assert (warn["gradcampp"]["empty"], warn["gradcampp"]["warn_empty"]) == (1, True)
    assert not warn["gradcam"]["warn_empty"] and not warn["gradcampp"]["warn_whole"]


# ---- the gallery's map store ------------------------------------------------------------------


def test_display_map_and_peak_known_answers():
    cam = np.zeros((4, 4))
    cam[1, 2], cam[3, 0] = 2.0, -5.0
    shown = display_map("gradcam", cam)
    assert shown.dtype == np.uint8 and shown[1, 2] == 255 and shown[3, 0] == 0
    assert map_peak(np.clip(cam, 0, None)) == (2.5, 1.5, 1)
    assert map_peak(np.zeros((3, 3)))[2] == 0
    ig = np.linspace(-1, 1, 10_000).reshape(100, 100)
    ig[0, 0] = 1000.0  # one extreme pixel: clipped at the 99th percentile of |attr|
    shown = display_map("integrated_gradients", ig)
    assert shown[0, 0] == 255 and (shown == 255).sum() > 50
    assert shown[50, 0] == pytest.approx(0, abs=3)  # |attr| ~ 0 in the middle of the ramp


def test_gallery_entries_map_the_peak_to_the_original_frame_and_prune(tmp_path):
    cam = np.zeros((224, 224))
    cam[10, 100] = 1.0
    entry = gallery_entry("gradcam", "a.png", "Mass", cam, lambda b: b * (1024 / 224))
    key = gallery_map_key("gradcam", "a.png", "Mass")
    assert set(entry) == {key, key + "|peak"}
    assert entry[key + "|peak"] == pytest.approx([100.5 * 1024 / 224, 10.5 * 1024 / 224, 1])
    other = gallery_entry("gradcam", "b.png", "Mass", cam, lambda b: b)
    batch = tmp_path / "batch"
    write_npz(batch / GALLERY_MAPS, {**entry, **other})
    assert keep_gallery_maps([batch], {("gradcam", "a.png", "Mass")}, tmp_path / "run.npz") == 1
    kept = GalleryMaps(tmp_path / "run.npz")
    assert set(kept.arrays) == set(entry)
    found = kept.get("gradcam", "a.png", ["Nodule", "Mass"])
    assert found is not None and found[0][10, 100] == 255
    assert kept.get("gradcam", "b.png", ["Mass"]) is None


def test_overlay_draws_colour_bar_boxes_and_maximum_at_known_pixels():
    unit = np.zeros((224, 224), dtype=np.uint8)
    img = overlay_image(None, unit, (200, 200, 400, 400), (100, 600, 300, 300), (800, 300, 1),
                        (1024, 1024), "Grad-CAM", size=448)
    a = np.asarray(img).astype(int)
    s = 448 / 1024
    assert img.size == (448 + BAR_PANEL, 448)
    # the colour bar: top of the bar is the map's maximum (viridis yellow), bottom is 0
    lut = colour_lut()
    assert tuple(a[BAR_MARGIN + 1, 448 + BAR_MARGIN + 3]) == tuple(lut[254]) or \
        np.abs(a[BAR_MARGIN + 1, 448 + BAR_MARGIN + 3] - lut[255]).max() <= 3
    assert np.abs(a[448 - BAR_MARGIN - 2, 448 + BAR_MARGIN + 3] - lut[0]).max() <= 3
    # the expert box: magenta on its edge (x = 200 px, halfway down)
    y = round(400 * s)
    assert tuple(a[y, round(200 * s)]) == EXPERT_COLOUR
    # the predicted box: black and white dashes along its top edge
    row = a[round(600 * s), round(100 * s) + 2: round(400 * s) - 2]
    assert (row == 255).all(axis=1).any() and (row == 0).all(axis=1).any()
    # the maximum: a white cross through (800, 300)
    cx, cy = round(800 * s), round(300 * s)
    assert tuple(a[cy, cx + 10]) == PEAK_COLOUR
    # nothing outside the boxes on the empty map is coloured: the grey canvas stays grey
    assert tuple(a[5, 440]) == (48, 48, 48)


def test_overlay_without_a_map_has_no_colour_bar():
    img = overlay_image(Image.new("L", (256, 256), 128), None, (0, 0, 10, 10), (np.nan,) * 4,
                        None, (1024, 1024), "Grad-CAM", size=256)
    a = np.asarray(img)
    assert (a[:, 256:] == 255).all()  # an empty white panel


# ---- small-n statistics and provenance --------------------------------------------------------


def test_rates_carry_counts_and_p_values_are_honest():
    assert with_count({"text": "0.543"}, 38 / 70, 70)["count"] == "38/70"
    assert "count" not in with_count({"text": "–"}, math.nan, 70)
    assert p_value(0.0, 200)["text"] == "< 0.001"
    assert p_value(0.0312, 200)["text"] == "0.031"
    small = p_value(0.0, 4)
    assert small["text"] == "not shown" and small["reason"] == "n = 4 < 10"
    assert p_value(0.2, 10)["text"] == "0.200"


def test_timestamps_to_the_second_with_the_zone():
    assert timestamp("2026-11-30T06:27:45.123456+00:00") == "2026-11-30 06:27:45 UTC"
    assert timestamp("2026-11-30T07:27:45.5+01:00") == "2026-11-30 07:27:45 +01:00"
    assert timestamp("2026-11-30T06:27:45") == "2026-11-30 06:27:45 (time zone not recorded)"
    assert timestamp("") == "" and timestamp("yesterday") == "yesterday"


def test_empty_provenance_fields_are_explained_or_left_out():
    run = {"run_id": "r", "started_at": "2026-11-30T06:27:16.5+00:00", "git_commit": "",
           "host": "",
           "model": {"name": "random-init(seed=0)", "source": "random-init", "seed": 0,
                     "published": False, "checkpoint_sha256": None, "fingerprint": "f" * 64}}
    prov = provenance(run)
    run_rows, model = dict(prov["run"]), dict(prov["model"])
    assert run_rows["started_at"] == "2026-11-30 06:27:16 UTC"
    assert "host" not in run_rows and run_rows["git_commit"].startswith("– (not recorded")
    assert model["checkpoint_sha256"].startswith("– (not applicable: a randomly initialized")
    assert model["published"].startswith("no: a randomly initialized model")
    assert all(v for _, v in prov["run"] + prov["model"])


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_report_files_get_the_mode_the_umask_gives(tmp_path, mask):
    old = os.umask(mask)
    try:
        run = build_run_dir(tmp_path / "run", n_boxes=8, findings=["Mass"], with_curves=False,
                            with_thumbs=False, with_maps=False)
        html = render_report(run, tmp_path / "out" / "report.html")
        written = atomic_write_text(tmp_path / "plain.txt", "x")
    finally:
        os.umask(old)
    want = 0o666 & ~mask
    for path in (html, html.with_name("summary.md"), written):
        assert stat.S_IMODE(path.stat().st_mode) == want, path
    assert plain_file_mode() == 0o666 & ~old
