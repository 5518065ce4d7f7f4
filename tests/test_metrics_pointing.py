"""Pointing game: tolerance, distance, ties, uninformative maps, batched table."""

from __future__ import annotations

import numpy as np
import pytest

from audit.metrics.pointing import (
    max_pixel_centres,
    point_box_distance,
    pointing_game_distance,
    pointing_game_hit,
    pointing_table,
    pointing_tolerance_px,
)

BOX = [10.0, 10.0, 5.0, 5.0]  # columns/rows 10..14 have their centres inside [10, 15]


def peaked(row, col, shape=(32, 32)):
    m = np.random.default_rng(0).uniform(0, 0.5, shape)
    m[row, col] = 1.0
    return m


def test_tolerance_is_15px_at_1024_scaled_to_the_map():
    assert pointing_tolerance_px(1024) == 15.0
    assert pointing_tolerance_px(224) == pytest.approx(15 * 224 / 1024) == 3.28125
    assert pointing_tolerance_px((512, 512)) == 7.5
    assert pointing_tolerance_px(224, frame_size=2048) == pytest.approx(1.640625)


def test_peak_inside_or_on_the_edge_pixel_is_a_hit_at_zero_tolerance():
    assert pointing_game_hit(peaked(12, 12), [BOX], 0.0)
    assert pointing_game_hit(peaked(10, 14), [BOX], 0.0)  # last column inside
    assert pointing_game_distance(peaked(14, 10), [BOX]) == 0.0


def test_peak_one_pixel_outside_is_a_hit_only_within_the_tolerance():
    m = peaked(12, 15)  # first column outside: centre x = 15.5, distance 0.5
    assert pointing_game_distance(m, [BOX]) == pytest.approx(0.5)
    assert not pointing_game_hit(m, [BOX], 0.0)
    assert not pointing_game_hit(m, [BOX], 0.49)
    assert pointing_game_hit(m, [BOX], 0.5)  # distance <= tolerance
    assert pointing_game_hit(m, [BOX], pointing_tolerance_px(224))
    m2 = peaked(12, 16)  # one pixel gap: distance 1.5
    assert pointing_game_distance(m2, [BOX]) == pytest.approx(1.5)
    assert not pointing_game_hit(m2, [BOX], 1.0)
    assert pointing_game_hit(m2, [BOX], pointing_tolerance_px(224))


def test_distance_to_a_corner_is_euclidean():
    m = peaked(16, 16)  # centre (16.5, 16.5); box corner (15, 15)
    assert pointing_game_distance(m, [BOX]) == pytest.approx(np.hypot(1.5, 1.5))
    np.testing.assert_allclose(
        point_box_distance([[16.5, 16.5], [12.0, 0.5]], [BOX]), [[np.hypot(1.5, 1.5)], [9.5]]
    )


def test_any_box_of_the_finding_counts():
    m = peaked(2, 2)
    assert not pointing_game_hit(m, [BOX], 0.0)
    assert pointing_game_hit(m, [BOX, [0.0, 0.0, 4.0, 4.0]], 0.0)


def test_tied_maxima_hit_when_any_is_within_tolerance_by_default():
    m = np.zeros((32, 32))
    m[0, 0] = 1.0  # first in raster order, far away
    m[12, 12] = 1.0  # inside the box
    np.testing.assert_array_equal(max_pixel_centres(m), [[0.5, 0.5], [12.5, 12.5]])
    assert pointing_game_hit(m, [BOX], 0.0)  # "any" (Quantus convention)
    assert not pointing_game_hit(m, [BOX], 0.0, ties="first")
    assert not pointing_game_hit(m, [BOX], 0.0, ties="all")
    m[0, 0] = 0.999
    assert pointing_game_hit(m, [BOX], 0.0, ties="all")


@pytest.mark.parametrize("fill", [0.0, -2.0, 0.3, np.nan])
def test_uninformative_maps_point_nowhere(fill):
    m = np.full((16, 16), fill)
    assert np.isnan(pointing_game_distance(m, [[0.0, 0.0, 16.0, 16.0]]))
    assert not pointing_game_hit(m, [[0.0, 0.0, 16.0, 16.0]], 100.0)
    assert max_pixel_centres(m).shape == (0, 2)


def test_negative_values_do_not_hide_the_positive_maximum():
    m = np.full((16, 16), -10.0)
    m[5, 5] = 0.01
    assert pointing_game_hit(m, [[5.0, 5.0, 1.0, 1.0]], 0.0)


def test_negative_tolerance_is_rejected():
    with pytest.raises(ValueError):
        pointing_game_hit(peaked(1, 1), [BOX], -1.0)


def test_pointing_table_batches_maps():
    maps = np.stack([peaked(12, 12), peaked(12, 16), np.zeros((32, 32))])
    df = pointing_table(maps, [[BOX], [BOX], [BOX]], tolerance_px=1.0)
    assert list(df["hit"]) == [True, False, False]
    np.testing.assert_allclose(df["distance"].to_numpy()[:2], [0.0, 1.5])
    assert np.isnan(df["distance"].iloc[2])
    assert list(df["n_tied_max"]) == [1, 1, 0]
    assert list(df["status"]) == ["ok", "ok", "empty"]
    assert df["point_x"].iloc[1] == 16.5
