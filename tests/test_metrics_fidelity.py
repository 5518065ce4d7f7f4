"""Deletion / insertion curves (Petsiuk 2018) on a toy model with a known relevant region."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audit.metrics.fidelity import (
    curve_auc,
    deletion_insertion_curves,
    fidelity_scores,
    fidelity_table,
    make_baseline,
    pixel_order,
    step_counts,
)

H = W = 32
REGION = (slice(8, 16), slice(10, 20))  # rows 8..15, columns 10..19: 80 px of 1024


def toy_predict(batch: torch.Tensor) -> torch.Tensor:
    """sigmoid(mean of channel 0 over the known region)."""
    return torch.sigmoid(batch[:, 0, REGION[0], REGION[1]].mean(dim=(1, 2)))


@pytest.fixture
def image():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, H, W, generator=g) * 0.2
    img[0, REGION[0], REGION[1]] = 3.0
    return img


@pytest.fixture
def true_map():
    m = np.zeros((H, W))
    m[REGION] = 1.0
    return m


def test_curve_has_51_points_and_the_right_endpoints(image, true_map):
    c = deletion_insertion_curves(toy_predict, image, true_map, baseline="zero")
    assert len(c.x) == len(c.deletion) == len(c.insertion) == 51
    assert c.x[0] == 0.0 and c.x[-1] == 1.0
    f_img = toy_predict(image[None]).item()
    f_base = toy_predict(torch.zeros(1, 1, H, W)).item()
    assert c.deletion[0] == pytest.approx(f_img, abs=1e-7)
    assert c.deletion[-1] == pytest.approx(f_base, abs=1e-7) == 0.5
    assert c.insertion[0] == pytest.approx(f_base, abs=1e-7)
    assert c.insertion[-1] == pytest.approx(f_img, abs=1e-7)
    assert c.deletion_auc == pytest.approx(curve_auc(c.x, c.deletion))
    assert c.order == "saliency" and c.baseline == "zero"


@pytest.mark.parametrize("baseline", ["zero", "blur", "mean"])
def test_true_region_beats_random_order(image, true_map, baseline):
    s = deletion_insertion_curves(toy_predict, image, true_map, baseline=baseline)
    r = deletion_insertion_curves(
        toy_predict, image, true_map, baseline=baseline, order="random", seed=1
    )
    assert s.deletion_auc < r.deletion_auc
    assert s.insertion_auc > r.insertion_auc
    # The region is 80 of 1024 px (7.8%): after 5 steps (10%) deletion has reached the baseline.
    assert s.deletion[5] == pytest.approx(s.deletion[-1], abs=1e-6)


def test_auc_of_a_known_curve():
    x = np.linspace(0, 1, 51)
    assert curve_auc(x, np.ones(51)) == pytest.approx(1.0)
    assert curve_auc(x, x) == pytest.approx(0.5)


def test_step_counts():
    np.testing.assert_array_equal(step_counts(100, 0.02), np.arange(0, 101, 2))
    k = step_counts(224 * 224, 0.02)
    assert len(k) == 51 and k[0] == 0 and k[-1] == 224 * 224
    assert k[1] == 1004  # round(0.02 * 50176 = 1003.52)
    k3 = step_counts(10, 0.3)  # ceil(1/0.3) = 4 steps, last one shorter
    np.testing.assert_array_equal(k3, [0, 3, 6, 9, 10])


def test_pixel_order_ties_are_stable_and_nonfinite_last():
    s = np.array([[0.5, 1.0, 0.5], [np.nan, 1.0, -np.inf]])
    np.testing.assert_array_equal(pixel_order(s), [1, 4, 0, 2, 3, 5])
    np.testing.assert_array_equal(pixel_order(np.zeros((2, 3))), np.arange(6))
    r1, r2 = pixel_order(s, "random", seed=4), pixel_order(s, "random", seed=4)
    np.testing.assert_array_equal(r1, r2)
    assert sorted(r1) == list(range(6))


def test_all_variants_go_in_one_batch_under_inference_mode(image, true_map):
    calls = []

    def spy(batch):
        calls.append((batch.shape[0], torch.is_inference_mode_enabled()))
        return toy_predict(batch)

    full = deletion_insertion_curves(spy, image, true_map, baseline="blur")
    assert calls == [(102, True)]
    calls.clear()
    chunked = deletion_insertion_curves(spy, image, true_map, baseline="blur", batch_size=25)
    assert [n for n, _ in calls] == [25, 25, 25, 25, 2]
    np.testing.assert_array_equal(full.deletion, chunked.deletion)
    np.testing.assert_array_equal(full.insertion, chunked.insertion)


def test_baselines():
    img = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 8, 8)
    assert torch.equal(make_baseline(img, "zero"), torch.zeros_like(img))
    mean = make_baseline(img, "mean")
    assert torch.allclose(mean[0], torch.full((8, 8), img[0].mean().item()))
    assert torch.allclose(mean[1], torch.full((8, 8), img[1].mean().item()))
    const = torch.full((1, 16, 16), 7.0)
    assert torch.allclose(make_baseline(const, "blur", blur_sigma=2.0), const)
    blurred = make_baseline(img, "blur", blur_sigma=1.0)
    assert blurred.shape == img.shape and not torch.equal(blurred, img)
    assert torch.equal(make_baseline(img, torch.tensor(3.0)), torch.full_like(img, 3.0))
    with pytest.raises(ValueError):
        make_baseline(img, "noise")


def test_custom_tensor_baseline_endpoints(image, true_map):
    base = torch.full_like(image, -1.0)
    c = deletion_insertion_curves(toy_predict, image, true_map, baseline=base)
    assert c.deletion[-1] == pytest.approx(torch.sigmoid(torch.tensor(-1.0)).item(), abs=1e-7)
    assert c.baseline == "tensor"


def test_fidelity_scores_and_table(image, true_map):
    sc = fidelity_scores(toy_predict, image, true_map, n_random=2, baseline="zero")
    assert sc["fidelity_deletion_auc"] < sc["fidelity_deletion_auc_random"]
    assert sc["fidelity_insertion_auc"] > sc["fidelity_insertion_auc_random"]

    def predict(batch, target):
        return toy_predict(batch) * (1.0 if target == 0 else 0.5)

    images = torch.stack([image, image])
    sal = np.stack([np.stack([true_map, true_map])] * 2)  # [2, 2, H, W]
    df = fidelity_table(predict, images, sal, [[0, 1], [0, 1]], n_random=1, baseline="zero")
    assert list(df["target"]) == [0, 1, 0, 1]
    col = "fidelity_deletion_auc"
    assert df[col].iloc[1] == pytest.approx(0.5 * df[col].iloc[0])


def test_curve_long_frame(image, true_map):
    c = deletion_insertion_curves(toy_predict, image, true_map, baseline="zero")
    f = c.as_frame()
    assert len(f) == 102 and set(f["family"]) == {"deletion", "insertion"}


def test_figures_and_long_rows_name_the_order(image, true_map):
    c = deletion_insertion_curves(toy_predict, image, true_map, baseline="zero")
    assert c.figures() == {
        "fidelity_deletion_auc": c.deletion_auc,
        "fidelity_insertion_auc": c.insertion_auc,
    }
    r = deletion_insertion_curves(toy_predict, image, true_map, baseline="zero", order="random")
    assert set(r.figures()) == {"fidelity_deletion_auc_random", "fidelity_insertion_auc_random"}
    rows = r.long_rows()
    assert len(rows) == 102
    assert rows[0] == {"family": "deletion_random", "step": 0, "x": 0.0, "value": r.deletion[0]}
    assert rows[-1]["family"] == "insertion_random" and rows[-1]["x"] == 1.0
