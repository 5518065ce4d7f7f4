"""Cross-checks against Quantus (installed reference implementation) on the same arrays.

Mappings (docs/metrics.md "Cross-checks"):
* Pointing game: box -> binary mask of the pixels whose centre lies in the closed box
  (interfaces.md rule); our hit at tolerance 0 == Quantus ``PointingGame`` (ties: any maximum
  on the mask) for maps with a positive maximum.
* IoBB and IoU: Quantus ``TopKIntersection`` with k = |B| (B = our thresholded largest
  component) gives the precision |B ∩ G| / |B|. When B is a rectangle whose pixels all outrank
  every other pixel, our predicted box is B, so our IoBB (ChestX-ray8: intersection over the
  predicted box) IS that precision, and with I = TKI x |B|: IoU = I / (|B| + |G| - I) and
  coverage = I / |G|.
* Deletion: Quantus ``PixelFlipping`` (features_in_step = 2% of the pixels, constant baseline)
  (``softmax=False``: the model's raw output for the target, the same callable as our
  ``predict_fn``) returns the curve after each step, i.e. our ``deletion[1:]`` with baseline
  "zero"; its AUC is
  the trapezoid rule with dx = 1 over that curve, so ours = ((d0 + d1) / 2 + quantus_auc) / n_steps.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

quantus = pytest.importorskip("quantus")

from audit.metrics.fidelity import deletion_insertion_curves  # noqa: E402
from audit.metrics.localization import localization_scores  # noqa: E402
from audit.metrics.pointing import pointing_game_hit  # noqa: E402


def box_mask(shape, box):
    h, w = shape
    x, y, bw, bh = box
    cx, cy = np.arange(w) + 0.5, np.arange(h) + 0.5
    return ((cy >= y) & (cy <= y + bh))[:, None] & ((cx >= x) & (cx <= x + bw))[None, :]


def tiny_model(n_in, n_out=3):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(n_in, n_out)).eval()


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_pointing_game_matches_quantus_at_zero_tolerance():
    rng = np.random.default_rng(0)
    h = w = 24
    maps, boxes = [], []
    for i in range(40):
        m = rng.uniform(0, 1, (h, w))
        if i % 4 == 0:  # tied maxima, one inside one outside some boxes
            m[rng.integers(h), rng.integers(w)] = 2.0
            m[rng.integers(h), rng.integers(w)] = 2.0
        x0, y0 = rng.uniform(0, 16, 2)
        bw, bh = rng.uniform(1.5, 8, 2)
        if i % 3 == 0:  # snap an edge onto a pixel centre: closed-box membership
            x0 = np.floor(x0) + 0.5
        maps.append(m)
        boxes.append([x0, y0, bw, bh])
    # Force several peaks to sit just inside / just outside their box.
    for i in range(1, 40, 5):
        x0, y0, bw, bh = boxes[i]
        c = int(np.floor(x0 + bw - 0.5)) + (i % 2)  # last inside column, or first outside
        r = int(np.floor(y0 + bh / 2))
        maps[i][r, min(c, w - 1)] = 5.0
    a = np.stack(maps)[:, None].astype(np.float32)
    s = np.stack([box_mask((h, w), b) for b in boxes])[:, None].astype(np.float32)
    assert s.reshape(40, -1).sum(1).min() > 0
    metric = quantus.PointingGame(disable_warnings=True, display_progressbar=False)
    ref = metric(
        model=tiny_model(h * w),
        x_batch=np.zeros_like(a),
        y_batch=np.zeros(40, int),
        a_batch=a,
        s_batch=s,
        device="cpu",
    )
    ours = [pointing_game_hit(maps[i], [boxes[i]], 0.0) for i in range(40)]
    assert [bool(v) for v in ref] == ours
    assert 0 < sum(ours) < 40  # both outcomes exercised


def test_iobb_equals_quantus_top_k_intersection_and_iou_derives_from_it():
    rng = np.random.default_rng(1)
    h = w = 32
    checked = 0
    for _ in range(12):
        # Predicted region B: a rectangle of high values; everything else low.
        r0, c0 = rng.integers(0, 20, 2)
        bh, bw = rng.integers(3, 12, 2)
        m = rng.uniform(0.0, 0.1, (h, w))
        m[r0 : r0 + bh, c0 : c0 + bw] = rng.uniform(0.5, 1.0, (bh, bw))
        # Ground truth G: an integer box (so |G| = its pixel count = its area).
        gx, gy = np.clip(np.array([c0, r0]) + rng.integers(-6, 7, 2), 0, 22)
        gw, gh = rng.integers(2, 10, 2)
        gt = [float(gx), float(gy), float(gw), float(gh)]
        k = int(bh * bw)
        metric = quantus.TopKIntersection(k=k, disable_warnings=True, display_progressbar=False)
        tki = metric(
            model=tiny_model(h * w),
            x_batch=np.zeros((1, 1, h, w), np.float32),
            y_batch=np.zeros(1, int),
            a_batch=m[None, None].astype(np.float32),
            s_batch=box_mask((h, w), gt)[None, None].astype(np.float32),
            device="cpu",
        )[0]
        inter = tki * k
        g_area = gw * gh
        r = localization_scores(m, [gt])
        np.testing.assert_array_equal(r.pred_box, [c0, r0, bw, bh])
        assert r.iobb == pytest.approx(tki, abs=1e-12)
        assert r.iou == pytest.approx(inter / (k + g_area - inter), abs=1e-12)
        assert r.coverage == pytest.approx(inter / g_area, abs=1e-12)
        checked += inter > 0
    assert checked >= 3  # overlapping cases were exercised


def test_deletion_curve_matches_quantus_pixel_flipping():
    rng = np.random.default_rng(2)
    h = w = 10  # 100 px: 2% = 2 px per step, 50 steps
    n = 3
    model = tiny_model(h * w)
    x = rng.normal(size=(n, 1, h, w)).astype(np.float32)
    a = rng.permutation(n * h * w).reshape(n, 1, h, w).astype(np.float32)  # no ties
    y = np.array([0, 1, 2])
    metric = quantus.PixelFlipping(
        features_in_step=2,
        perturb_baseline=0.0,
        disable_warnings=True,
        display_progressbar=False,
    )
    ref = np.asarray(
        metric(model=model, x_batch=x, y_batch=y, a_batch=a, device="cpu", softmax=False)
    )
    # Quantus' return_auc_per_sample calls np.trapz (gone in NumPy 2.4); its definition is
    # the trapezoid rule with dx = 1 over the returned curve, computed here directly.
    ref_auc = np.trapezoid(ref, dx=1, axis=1)
    assert ref.shape == (n, 50)
    for i in range(n):
        c = deletion_insertion_curves(
            lambda b, t=int(y[i]): model(b)[:, t],
            torch.from_numpy(x[i]),
            a[i, 0],
            baseline="zero",
        )
        np.testing.assert_allclose(c.deletion[1:], ref[i], rtol=0, atol=1e-5)
        d = c.deletion
        assert c.deletion_auc == pytest.approx(((d[0] + d[1]) / 2 + ref_auc[i]) / 50, abs=1e-5)
