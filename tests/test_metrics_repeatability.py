"""Repeatability (determinism, test-retest, replicates) and the similarity measures."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity

from audit.metrics.localization import localization_scores
from audit.metrics.repeatability import (
    determinism_max_abs_diff,
    gaussian_noise_perturbation,
    repeatability_figures,
    replicate_ssim,
    replicate_ssim_batch,
    shift_image,
    shift_image_and_boxes,
    test_retest_scores,
    test_retest_table,
)
from audit.metrics.similarity import hog_similarity, normalize_unit, pearson, spearman, ssim


def blob(shape=(48, 48), cx=20.0, cy=24.0, s=6.0):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))


# ---------------------------------------------------------------- similarity


def test_spearman_equals_scipy_on_maps_with_ties():
    rng = np.random.default_rng(3)
    a = np.round(rng.uniform(0, 1, (20, 20)), 1)  # many ties
    b = np.round(a + rng.normal(0, 0.3, a.shape), 1)
    assert spearman(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel())[0], abs=1e-12)
    assert spearman(-a, b, absolute=True) == pytest.approx(
        spearmanr(np.abs(a).ravel(), np.abs(b).ravel())[0], abs=1e-12
    )


def test_correlation_conventions_for_constant_and_nonfinite_maps():
    c = np.zeros((8, 8))
    v = np.arange(64.0).reshape(8, 8)
    assert spearman(c, c) == 1.0
    assert spearman(c, v) == 0.0
    assert pearson(c, v) == 0.0
    assert np.isnan(spearman(v, np.full((8, 8), np.nan)))
    assert np.isnan(ssim(v, np.full((8, 8), np.nan)))


def test_ssim_equals_skimage_on_unit_normalized_maps():
    rng = np.random.default_rng(1)
    a = blob() * 5 + 1
    b = blob(cx=23) * 3 + rng.uniform(0, 0.2, a.shape)
    ref = structural_similarity(normalize_unit(a), normalize_unit(b), data_range=1.0, win_size=7)
    assert ssim(a, b) == pytest.approx(ref, abs=1e-12)
    assert ssim(a, a) == pytest.approx(1.0)
    # "positive" normalization: max(m, 0) / max on both sides.
    pa = np.maximum(a - 2, 0) / np.maximum(a - 2, 0).max()
    pb = b / b.max()
    assert ssim(a - 2, b, normalize="positive") == pytest.approx(
        structural_similarity(pa, pb, data_range=1.0), abs=1e-12
    )


def test_ssim_small_maps_use_the_largest_odd_window():
    a = np.arange(25.0).reshape(5, 5)
    assert ssim(a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ssim(np.ones((2, 2)), np.ones((2, 2)))


def test_hog_similarity_is_one_for_identical_and_lower_for_moved_structure():
    a = blob((64, 64), 20, 20)
    assert hog_similarity(a, a) == pytest.approx(1.0)
    assert hog_similarity(a, 3 * a) == pytest.approx(1.0)  # scale invariant after normalization
    assert hog_similarity(a, blob((64, 64), 44, 44)) < 0.9


# ---------------------------------------------------------------- determinism


def test_determinism_max_abs_diff():
    a = blob()
    assert determinism_max_abs_diff(a, a.copy()) == 0.0
    b = a.copy()
    b[3, 4] += 0.25
    assert determinism_max_abs_diff(a, b) == pytest.approx(0.25)
    assert determinism_max_abs_diff(torch.tensor(a), torch.tensor(b)) == pytest.approx(0.25)
    n1 = a.copy()
    n1[0, 0] = np.nan
    assert determinism_max_abs_diff(n1, n1.copy()) == 0.0  # NaN at the same place
    assert determinism_max_abs_diff(n1, a) == np.inf  # NaN on one side only
    with pytest.raises(ValueError):
        determinism_max_abs_diff(a, a[:-1])


# ---------------------------------------------------------------- perturbations


def test_gaussian_noise_is_seeded_and_has_the_requested_sigma():
    img = np.zeros((1, 200, 200), np.float32)
    a = gaussian_noise_perturbation(img, 20.0, np.random.default_rng(5))
    b = gaussian_noise_perturbation(img, 20.0, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32
    assert a.std() == pytest.approx(20.0, rel=0.02)
    t = gaussian_noise_perturbation(torch.zeros(1, 200, 200), 20.0, np.random.default_rng(5))
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), a, rtol=1e-6)


def test_shift_moves_content_with_edge_padding():
    img = np.arange(20.0).reshape(4, 5)
    s = shift_image(img, 2, 1)
    np.testing.assert_array_equal(s[1:, 2:], img[:-1, :-2])  # content moved right 2, down 1
    np.testing.assert_array_equal(s[0], s[1])  # top row replicated
    np.testing.assert_array_equal(s[:, 0], s[:, 2])  # left columns replicated
    np.testing.assert_array_equal(shift_image(torch.tensor(img), 2, 1).numpy(), s)
    np.testing.assert_array_equal(shift_image(img, -1, 0)[:, :-1], img[:, 1:])


def test_shift_image_and_boxes_keeps_the_box_on_the_content():
    box = [10.0, 12.0, 6.0, 4.0]
    m = np.zeros((1, 32, 32))
    m[0, 12:16, 10:16] = 1.0
    shifted, boxes = shift_image_and_boxes(m, [box], 2, -2)
    np.testing.assert_array_equal(boxes, [[12.0, 10.0, 6.0, 4.0]])
    assert localization_scores(shifted[0], boxes).iou == 1.0
    # Clipped at the frame.
    _, clipped = shift_image_and_boxes(m, [[28.0, 0.0, 4.0, 3.0]], 2, -1)
    np.testing.assert_array_equal(clipped, [[30.0, 0.0, 2.0, 2.0]])


# ---------------------------------------------------------------- test-retest


def test_test_retest_identical_maps_score_perfectly():
    a = blob()
    box = [[14.0, 18.0, 12.0, 12.0]]
    r = test_retest_scores(a, a.copy(), box, box)
    assert r["ssim"] == pytest.approx(1.0)
    assert r["spearman"] == pytest.approx(1.0)
    assert r["delta_iou"] == 0.0 and r["hit_changed"] is False


def test_test_retest_realigns_a_shifted_map_before_comparing():
    a = blob()  # values at the border are ~0, so edge padding loses nothing visible
    a[:3, :] = 0
    a[-3:, :] = 0
    a[:, :3] = 0
    a[:, -3:] = 0
    box = [[14.0, 18.0, 12.0, 12.0]]
    shifted, sboxes = shift_image_and_boxes(a, box, 2, -2)
    r = test_retest_scores(a, shifted, box, sboxes, shift=(2, -2))
    assert r["ssim"] == pytest.approx(1.0)
    assert r["spearman"] == pytest.approx(1.0)
    assert r["delta_iou"] == pytest.approx(0.0)
    assert not r["hit_changed"]
    unaligned = test_retest_scores(a, shifted, box, sboxes)
    assert unaligned["ssim"] < r["ssim"]


def test_test_retest_detects_a_moved_peak():
    a = blob()
    b = blob(cx=36, cy=10)
    box = [[14.0, 18.0, 12.0, 12.0]]
    r = test_retest_scores(a, b, box, box, tolerance_px=0.0)
    assert r["hit_orig"] and not r["hit_perturbed"] and r["hit_changed"]
    assert r["delta_iou"] == pytest.approx(
        localization_scores(b, box).iou - localization_scores(a, box).iou
    )
    assert r["delta_iou"] < 0
    assert r["ssim"] < 0.5
    df = test_retest_table(np.stack([a, a]), np.stack([a, b]), [box, box], [box, box])
    assert list(df["hit_changed"]) == [False, True]


# ---------------------------------------------------------------- replicates


def test_replicate_ssim_is_the_mean_over_pairs():
    maps = [blob(cx=c) for c in (20, 22, 27)]
    expected = np.mean([ssim(x, y) for x, y in combinations(maps, 2)])
    assert replicate_ssim(maps) == pytest.approx(expected)
    assert replicate_ssim([maps[0], maps[0]]) == pytest.approx(1.0)
    assert np.isnan(replicate_ssim(maps[:1]))
    stack = np.stack([np.stack([m, m]) for m in maps])  # [R=3, N=2, H, W]
    np.testing.assert_allclose(replicate_ssim_batch(stack), [expected, expected])


# ---------------------------------------------------------------- figures for a run


def _blob_explainer(net, x, targets):
    """An 'explainer' that returns a blob of the input: shift-equivariant, deterministic."""
    img = x.detach().numpy()[:, 0]
    return np.repeat(np.maximum(img, 0)[:, None], targets.shape[1], axis=1)


def test_repeatability_figures_of_an_equivariant_deterministic_explainer():
    img = np.zeros((48, 48))
    img[10:38, 10:38] = blob()[10:38, 10:38]  # zero border: shifts lose nothing
    image = torch.tensor(img[None], dtype=torch.float64)
    calls = []

    def explain(net, x, targets):
        calls.append(tuple(x.shape))
        return _blob_explainer(net, x, targets)

    box = [[14.0, 18.0, 12.0, 12.0]]
    fig = repeatability_figures(explain, None, image, 3, box, noise_sigma=0.0, shift_px=2)
    assert calls == [(1, 1, 48, 48), (1, 1, 48, 48), (3, 1, 48, 48)]
    assert fig["determinism_max_abs_diff"] == 0.0
    for k in ("noise_ssim", "noise_spearman", "shift_ssim", "shift_spearman"):
        assert fig[k] == pytest.approx(1.0), k
    assert fig["shift_delta_iou"] == pytest.approx(0.0)
    assert fig["noise_hit_changed"] == 0.0 and fig["shift_hit_changed"] == 0.0
    noisy = repeatability_figures(explain, None, image, 3, box, noise_sigma=0.2, seed=1)
    assert noisy["noise_ssim"] < 0.99
