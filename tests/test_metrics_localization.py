"""Localization metrics: largest-component box, IoU, IoBB (ChestX-ray8: over the predicted box),
coverage, sweeps, hits, edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from audit.metrics.localization import (
    SWEEP_THRESHOLDS,
    as_boxes,
    box_coverage,
    box_iobb,
    box_iou,
    largest_component_box,
    largest_component_mask,
    localization_scores,
    localization_sweep,
    localization_table,
    map_status,
)


def box_indicator(shape, box):
    """Map equal to 1 on the pixels whose centres lie in the closed box (interfaces.md)."""
    h, w = shape
    x, y, bw, bh = box
    cx = np.arange(w) + 0.5
    cy = np.arange(h) + 0.5
    inside_x = (cx >= x) & (cx <= x + bw)
    inside_y = (cy >= y) & (cy <= y + bh)
    return (inside_y[:, None] & inside_x[None, :]).astype(np.float64)


def test_map_equal_to_box_indicator_gives_iou_one_and_all_hits():
    box = [12.0, 7.0, 9.0, 5.0]
    m = box_indicator((32, 32), box)
    r = localization_scores(m, [box])
    np.testing.assert_array_equal(r.pred_box, box)
    assert r.iou == 1.0 and r.iobb == 1.0 and r.coverage == 1.0
    assert all(r.hits.values())
    assert r.status == "ok"


def test_component_box_uses_continuous_coordinates_c0_to_c1_plus_one():
    m = np.zeros((10, 10))
    m[2, 3] = 1.0  # a single pixel at row 2, column 3
    np.testing.assert_array_equal(largest_component_box(m), [3.0, 2.0, 1.0, 1.0])
    m[4, 6] = 0.5
    m[3, 4:6] = 0.5  # joins diagonally -> columns 3..6, rows 2..4
    np.testing.assert_array_equal(largest_component_box(m), [3.0, 2.0, 4.0, 3.0])


def test_hand_computed_iou_iobb_and_coverage_of_overlapping_rectangles():
    pred = [2.0, 2.0, 4.0, 4.0]  # area 16
    # Integer box: intersection 2 x 2 = 4 -> IoU 4/28 = 1/7, IoBB 4/16, coverage 4/16.
    assert box_iou(pred, [[4.0, 4.0, 4.0, 4.0]])[0] == pytest.approx(1 / 7, abs=1e-15)
    assert box_iobb(pred, [[4.0, 4.0, 4.0, 4.0]])[0] == pytest.approx(0.25, abs=1e-15)
    # Fractional box (3.5, 1.5, 2, 6), area 12: intersection 2 x 4 = 8 -> IoU 8/20,
    # IoBB = 8 / |predicted| = 8/16 (ChestX-ray8), coverage = 8 / |expert| = 8/12.
    assert box_iou(pred, [[3.5, 1.5, 2.0, 6.0]])[0] == pytest.approx(0.4, abs=1e-15)
    assert box_iobb(pred, [[3.5, 1.5, 2.0, 6.0]])[0] == pytest.approx(0.5, abs=1e-15)
    assert box_coverage(pred, [[3.5, 1.5, 2.0, 6.0]])[0] == pytest.approx(2 / 3, abs=1e-15)
    # Disjoint and touching boxes: 0.
    assert box_iou(pred, [[6.0, 2.0, 3.0, 3.0]])[0] == 0.0
    assert box_iobb(pred, [[20.0, 20.0, 3.0, 3.0]])[0] == 0.0
    assert box_coverage(pred, [[6.0, 2.0, 3.0, 3.0]])[0] == 0.0


def test_iobb_divides_by_the_predicted_box_so_a_whole_image_map_does_not_score_one():
    # A map positive everywhere (a gentle ramp, every pixel >= 15% of the maximum): the largest
    # component is the whole 224 x 224 image. Over a 10 x 20 expert box, ChestX-ray8's IoBB is
    # the box area over the image area, not 1 (the expert-box-normalized ratio, coverage, is 1).
    h = w = 224
    m = 1.0 + np.linspace(0.0, 1.0, h * w).reshape(h, w)
    gt = [100.0, 60.0, 10.0, 20.0]
    r = localization_scores(m, [gt])
    np.testing.assert_array_equal(r.pred_box, [0.0, 0.0, w, h])
    assert r.iobb == pytest.approx(200 / (h * w), abs=1e-15)
    assert r.iobb < 0.005 and not r.hits["iobb_hit_0.1"]
    assert r.coverage == 1.0
    assert r.iou == pytest.approx(200 / (h * w), abs=1e-15)  # G inside P: IoU = |G| / |P|


def test_map_driven_iou_matches_hand_computation_and_hit_thresholds():
    m = np.zeros((16, 16))
    m[2:6, 2:6] = 1.0  # predicted box (2, 2, 4, 4)
    r = localization_scores(m, [[4.0, 4.0, 4.0, 3.0]])  # intersection 2 x 2 = 4
    assert r.iou == pytest.approx(4 / 24)
    assert r.iobb == pytest.approx(0.25)  # 4 / 16 (predicted), not 4 / 12 (expert)
    assert r.coverage == pytest.approx(1 / 3)
    assert r.hits == {
        "iou_hit_0.1": True,
        "iou_hit_0.25": False,
        "iou_hit_0.5": False,
        "iobb_hit_0.1": True,
        "iobb_hit_0.25": True,  # >= : exactly 0.25 is a hit (1/3 would hit too; 0.25 is IoBB)
        "iobb_hit_0.5": False,
    }


def test_two_disjoint_blobs_pick_the_larger_even_without_the_maximum():
    m = np.zeros((20, 20))
    m[1:4, 1:4] = 1.0  # 9 px, holds the global maximum
    m[10:14, 12:16] = 0.5  # 16 px
    np.testing.assert_array_equal(largest_component_box(m), [12.0, 10.0, 4.0, 4.0])


def test_eight_connectivity_joins_diagonal_pixels():
    m = np.zeros((12, 12))
    for i in range(5):  # diagonal of 5 px: one component under 8-connectivity
        m[1 + i, 1 + i] = 0.6
    m[8:10, 8:10] = 1.0  # 4 px square
    np.testing.assert_array_equal(largest_component_box(m), [1.0, 1.0, 5.0, 5.0])


def test_equal_size_components_tie_goes_to_the_higher_peak_then_raster_order():
    m = np.zeros((12, 12))
    m[1:4, 1:4] = 0.8  # first in raster order
    m[7:10, 7:10] = 0.8
    m[8, 8] = 1.0  # the later blob holds the maximum
    np.testing.assert_array_equal(largest_component_box(m), [7.0, 7.0, 3.0, 3.0])
    m[8, 8] = 0.8  # equal peaks -> first in raster order
    m[0, 11] = 1.0  # a 1-px maximum elsewhere keeps max at 1
    np.testing.assert_array_equal(largest_component_box(m), [1.0, 1.0, 3.0, 3.0])
    # Raster order is by first pixel (row-major): a blob starting on an earlier row wins.
    mm = np.zeros((12, 12))
    mm[5:8, 0:3] = 1.0
    mm[2:5, 8:11] = 1.0
    np.testing.assert_array_equal(largest_component_box(mm), [8.0, 2.0, 3.0, 3.0])


def test_largest_component_mask_of_empty_mask_is_empty():
    assert not largest_component_mask(np.zeros((4, 4), bool)).any()


def test_binarization_threshold_is_inclusive_and_relative_to_the_maximum():
    m = np.zeros((10, 10))
    m[4, 4] = 2.0
    m[4, 5] = 0.3  # exactly 15% of the maximum
    np.testing.assert_array_equal(largest_component_box(m, 0.15), [4.0, 4.0, 2.0, 1.0])
    np.testing.assert_array_equal(largest_component_box(m, 0.16), [4.0, 4.0, 1.0, 1.0])


def test_negative_values_are_ignored_positive_part_only():
    m = np.full((10, 10), -5.0)
    m[2:4, 6:9] = 0.2
    np.testing.assert_array_equal(largest_component_box(m), [6.0, 2.0, 3.0, 2.0])


def test_threshold_sweep_box_area_is_non_increasing_for_a_single_radial_blob():
    yy, xx = np.mgrid[0:64, 0:64]
    m = np.exp(-((xx - 40.3) ** 2 + (yy - 22.7) ** 2) / (2 * 9.0**2))
    df = localization_sweep(m, [[30.0, 15.0, 20.0, 16.0]])
    assert list(df["threshold"]) == list(SWEEP_THRESHOLDS)
    assert len(df) == 19 and df["threshold"].iloc[2] == 0.15
    area = df["pred_area"].to_numpy()
    assert np.all(np.diff(area) <= 0)
    assert area[0] > area[-1]
    # Boxes are nested as the threshold rises.
    x0, y0 = df["pred_x"].to_numpy(), df["pred_y"].to_numpy()
    x1, y1 = x0 + df["pred_w"].to_numpy(), y0 + df["pred_h"].to_numpy()
    assert np.all(np.diff(x0) >= 0) and np.all(np.diff(y0) >= 0)
    assert np.all(np.diff(x1) <= 0) and np.all(np.diff(y1) <= 0)
    # Coverage of a box inside the blob cannot grow as the predicted box shrinks; its IoBB
    # (over the predicted box) cannot fall while the predicted box still contains it.
    inner = localization_sweep(m, [[38.0, 20.0, 4.0, 4.0]])
    assert np.all(np.diff(inner["coverage"].to_numpy()) <= 1e-12)
    contains = inner[inner["coverage"] == 1.0]["iobb"].to_numpy()
    assert len(contains) >= 2 and np.all(np.diff(contains) >= -1e-12)


def test_multi_box_finding_takes_the_best_match_per_metric():
    m = np.zeros((20, 20))
    m[0:10, 0:10] = 1.0  # predicted box (0, 0, 10, 10), area 100
    boxes = [[0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 10.0, 10.0]]
    r = localization_scores(m, boxes)
    np.testing.assert_allclose(r.iou_per_box, [4 / 100, 25 / 175])
    np.testing.assert_allclose(r.iobb_per_box, [4 / 100, 25 / 100])
    np.testing.assert_allclose(r.coverage_per_box, [1.0, 0.25])
    assert r.iou == pytest.approx(25 / 175)  # from box 1
    assert r.iobb == pytest.approx(0.25)  # from box 1
    assert r.coverage == 1.0  # from box 0: each metric is its own best over the boxes
    assert r.best_box_index == 1  # the best-IoU box
    assert r.hits["iobb_hit_0.25"] and not r.hits["iobb_hit_0.5"]
    assert r.hits["iou_hit_0.1"] and not r.hits["iou_hit_0.25"]


def test_best_box_index_ties_prefer_larger_iobb_then_lower_index():
    m = np.zeros((20, 20))
    m[0:4, 0:4] = 1.0  # predicted (0, 0, 4, 4), area 16
    # Box 0: inside the prediction, area 8 -> IoU 8/16 = 0.5, IoBB 8/16 = 0.5.
    # Box 1: intersection 12, area 20 -> IoU 12/24 = 0.5, IoBB 12/16 = 0.75.
    r = localization_scores(m, [[0.0, 0.0, 4.0, 2.0], [1.0, 0.0, 5.0, 4.0]])
    np.testing.assert_array_equal(r.iou_per_box, [0.5, 0.5])
    np.testing.assert_array_equal(r.iobb_per_box, [0.5, 0.75])
    assert r.best_box_index == 1
    # Identical boxes: lowest index.
    r2 = localization_scores(m, [[1.0, 0.0, 5.0, 4.0], [1.0, 0.0, 5.0, 4.0]])
    assert r2.best_box_index == 0


@pytest.mark.parametrize(
    "fill,status",
    [(0.0, "empty"), (-1.0, "empty"), (np.nan, "nonfinite"), (0.7, "flat")],
)
def test_uninformative_maps_have_no_box_zero_scores_and_no_hits(fill, status):
    m = np.full((16, 16), fill)
    assert map_status(m) == status
    r = localization_scores(m, [[2.0, 2.0, 5.0, 5.0], [8.0, 8.0, 2.0, 2.0]])
    assert r.status == status and r.pred_box is None
    assert r.iou == 0.0 and r.iobb == 0.0 and r.coverage == 0.0
    assert not any(r.hits.values())
    assert largest_component_box(m) is None


def test_single_nonfinite_pixel_makes_the_map_nonfinite():
    m = np.zeros((8, 8))
    m[3, 3] = 1.0
    m[0, 0] = np.inf
    assert map_status(m) == "nonfinite"
    assert localization_scores(m, [[3.0, 3.0, 1.0, 1.0]]).iou == 0.0


def test_invalid_boxes_are_rejected():
    with pytest.raises(ValueError):
        as_boxes([[0, 0, 0, 3]])
    with pytest.raises(ValueError):
        as_boxes([[0, 0, np.nan, 3]])
    with pytest.raises(ValueError):
        as_boxes([[0, 0, 3]])
    assert as_boxes([1, 2, 3, 4]).shape == (1, 4)


def test_localization_table_one_row_per_box_with_best_match_and_pointing():
    maps = np.zeros((3, 16, 16))
    maps[0, 2:6, 2:6] = 1.0
    maps[1, 10:14, 10:14] = 1.0
    # map 2 is empty
    boxes = [
        np.array([[2.0, 2.0, 4.0, 4.0], [9.0, 9.0, 3.0, 3.0]]),
        np.zeros((0, 4)),  # no box: no row
        np.array([[1.0, 1.0, 3.0, 3.0]]),
    ]
    df = localization_table(maps, boxes, tolerance_px=0.0)
    assert list(df["map_index"]) == [0, 0, 2]
    assert list(df["box_index"]) == [0, 1, 0]
    np.testing.assert_allclose(df["iou"], [1.0, 0.0, 0.0])
    assert list(df["best_match"]) == [True, False, True]
    assert list(df["pointing_hit"]) == [True, False, False]
    assert list(df["status"]) == ["ok", "ok", "empty"]
    assert np.isnan(df["pred_x"].iloc[2])
    np.testing.assert_allclose(df["iobb"], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(df["coverage"], [1.0, 0.0, 0.0])
    for col in ["iou_hit_0.1", "iou_hit_0.25", "iou_hit_0.5", "iobb_hit_0.5", "threshold"]:
        assert col in df.columns


def test_localization_table_default_tolerance_is_15_px_at_1024_scaled_to_map_width():
    m = np.zeros((1, 224, 224))
    m[0, 100, 123] = 1.0  # centre x = 123.5: 3.5 px right of a box ending at x = 120
    df = localization_table(m, [np.array([[100.0, 90.0, 20.0, 20.0]])])
    assert df["pointing_distance"].iloc[0] == pytest.approx(3.5)
    assert not df["pointing_hit"].iloc[0]  # 3.5 > 15 * 224 / 1024 = 3.28125
    df2 = localization_table(m, [np.array([[100.0, 90.0, 20.5, 20.0]])])
    assert df2["pointing_distance"].iloc[0] == pytest.approx(3.0)
    assert df2["pointing_hit"].iloc[0]  # 3.0 <= 3.28125


def test_localize_then_scores_against_boxes_equals_localization_scores():
    from audit.metrics.localization import localize, scores_against_boxes

    m = np.zeros((20, 20))
    m[0:10, 0:10] = 1.0
    boxes = [[0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 10.0, 10.0]]
    pred = localize(m, 0.15)
    np.testing.assert_array_equal(pred.box, [0.0, 0.0, 10.0, 10.0])
    assert pred.status == "ok" and pred.threshold == 0.15
    per_box = scores_against_boxes(pred, boxes)
    ref = localization_scores(m, boxes)
    assert [s["iou"] for s in per_box] == list(ref.iou_per_box)
    assert [s["iobb"] for s in per_box] == list(ref.iobb_per_box)
    assert [s["coverage"] for s in per_box] == list(ref.coverage_per_box)
    assert per_box[1]["iobb_hit_0.25"] and not per_box[1]["iou_hit_0.25"]
    empty = localize(np.zeros((20, 20)))
    assert empty.box is None and empty.status == "empty"
    assert scores_against_boxes(empty, boxes)[1] == {
        "iou": 0.0,
        "iobb": 0.0,
        "coverage": 0.0,
        **{f"{f}_hit_{t:g}": False for f in ("iou", "iobb") for t in (0.1, 0.25, 0.5)},
    }
