"""Model-parameter randomization (Adebayo 2018) on a random-init torchxrayvision DenseNet-121."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import torchxrayvision as xrv
from scipy import ndimage
from torch import nn

from audit.metrics.randomization import (
    DENSENET_CASCADE,
    DENSENET_CASCADE_SHORT,
    block_generator,
    cascading_randomization,
    curve_long_rows,
    fully_random_ssim,
    independent_randomization,
    randomization_figures,
    randomization_flag,
    randomize_module,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The CI box has 2 shared cores: one intra-op thread is several times faster than two
    # oversubscribed ones for a single 224x224 DenseNet forward.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def closed_form_gradcam(net, x, targets):
    """CAM on rectified norm5 features weighted by the classifier row of each target
    (equals Grad-CAM at norm5 -> ReLU -> GAP -> linear up to a positive factor)."""
    with torch.no_grad():
        a = F.relu(net.features(x))  # [B, C, 7, 7]
        w = net.classifier.weight[targets]  # [B, K, C]
        cam = F.relu(torch.einsum("bkc,bchw->bkhw", w, a))
        return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False).numpy()


def sobel_saliency(net, x, targets):
    """Edge magnitude of the input: ignores the model entirely."""
    img = x.detach().numpy()[:, 0].astype(np.float64)
    mag = np.stack([np.hypot(ndimage.sobel(i, 0), ndimage.sobel(i, 1)) for i in img])
    return np.repeat(mag[:, None], targets.shape[1], axis=1)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return xrv.models.DenseNet(weights=None).eval()


@pytest.fixture(scope="module")
def x():
    yy, xx = torch.meshgrid(torch.arange(224.0), torch.arange(224.0), indexing="ij")
    lungs = torch.exp(-((xx - 70) ** 2 + (yy - 110) ** 2) / 2000) + torch.exp(
        -((xx - 154) ** 2 + (yy - 110) ** 2) / 2000
    )
    g = torch.Generator().manual_seed(1)
    img = 1024 * (lungs - 0.5) + 100 * torch.randn(224, 224, generator=g)
    return img.clamp(-1024, 1024)[None, None]


@pytest.fixture(scope="module")
def targets_and_maps(net, x):
    """One target whose original CAM is not constant (a random net's CAM can be all zero)."""
    all_t = torch.arange(18)[None]
    maps = closed_form_gradcam(net, x, all_t)[0]
    ok = [k for k in range(18) if maps[k].max() > maps[k].min()]
    assert ok, "no target with a non-constant CAM"
    k = ok[0]
    return torch.tensor([[k]]), maps[k][None, None]


@pytest.fixture(scope="module")
def gradcam_cascade(net, x, targets_and_maps):
    targets, orig = targets_and_maps
    before = {k: v.clone() for k, v in net.state_dict().items()}
    df = cascading_randomization(net, x, targets, closed_form_gradcam, seed=7, original_maps=orig)
    return df, before


def test_cascade_has_one_row_per_block_and_randomizes_every_parameter(gradcam_cascade):
    df, _ = gradcam_cascade
    assert list(df["step"]) == list(range(len(DENSENET_CASCADE) + 1))
    assert list(df["block"]) == [""] + list(DENSENET_CASCADE)
    frac = df["fraction_randomized"].to_numpy()
    assert frac[0] == 0.0 and frac[-1] == pytest.approx(1.0)
    assert np.all(np.diff(frac) >= 0)
    row0 = df.iloc[0]
    for col in ("spearman", "spearman_abs", "ssim", "hog_similarity"):
        assert row0[col] == pytest.approx(1.0)
        assert df[col].notna().all()


def test_gradcam_maps_drop_under_cascading_randomization(gradcam_cascade):
    df, _ = gradcam_cascade
    last = df.iloc[-1]
    assert last["spearman_abs"] < 0.5
    assert last["ssim"] < 0.9
    assert not randomization_flag(df)


def test_a_saliency_that_ignores_the_model_shows_no_drop_and_is_flagged(net, x):
    targets = torch.tensor([[0, 3]])
    df = cascading_randomization(
        net, x, targets, sobel_saliency, seed=7, blocks=DENSENET_CASCADE_SHORT
    )
    assert len(df) == 2 * (len(DENSENET_CASCADE_SHORT) + 1)
    for col in ("spearman", "spearman_abs", "ssim", "hog_similarity"):
        np.testing.assert_allclose(df[col], 1.0)
    assert randomization_flag(df)
    assert randomization_flag(df, metric="ssim", threshold=0.9)
    np.testing.assert_allclose(fully_random_ssim(net, x, targets, sobel_saliency, seed=3), 1.0)


def test_callers_net_is_unchanged(net, x, targets_and_maps, gradcam_cascade):
    _, before = gradcam_cascade
    targets, orig = targets_and_maps
    independent_randomization(
        net, x, targets, closed_form_gradcam, seed=7, blocks=("classifier",), original_maps=orig
    )
    fully_random_ssim(net, x, targets, closed_form_gradcam, seed=3, original_maps=orig)
    after = net.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_independent_first_block_equals_cascading_first_step(
    net, x, targets_and_maps, gradcam_cascade
):
    df, _ = gradcam_cascade
    targets, orig = targets_and_maps
    ind = independent_randomization(
        net,
        x,
        targets,
        closed_form_gradcam,
        seed=7,
        blocks=("classifier", "features.norm5"),
        original_maps=orig,
    )
    cols = ["spearman", "spearman_abs", "ssim", "hog_similarity", "fraction_randomized"]
    pd.testing.assert_frame_equal(ind.iloc[1][cols].to_frame(), df.iloc[1][cols].to_frame())
    # norm5 alone on a net at initialization: BN re-init is a no-op -> maps unchanged.
    assert ind.iloc[2]["spearman"] == pytest.approx(1.0)
    assert ind.iloc[2]["block"] == "features.norm5"


def test_fully_random_gradcam_is_dissimilar(net, x, targets_and_maps):
    targets, orig = targets_and_maps
    s = fully_random_ssim(net, x, targets, closed_form_gradcam, seed=3, original_maps=orig)
    assert s.shape == (1, 1) and s[0, 0] < 0.9


# ------------------------------------------------------------------ unit level


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=True),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    )


def test_randomize_module_is_seeded_and_reinitializes_each_kind():
    a, b, c = small_net(), small_net(), small_net()
    for m in (a, b, c):
        m[1].running_mean.fill_(5.0)
        m[1].weight.data.fill_(3.0)
    n = randomize_module(a, "", block_generator(1, "x"))
    randomize_module(b, "", block_generator(1, "x"))
    randomize_module(c, "", block_generator(2, "x"))
    assert n == sum(p.numel() for p in a.parameters())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a[0].weight, c[0].weight)
    assert torch.all(a[0].bias == 0) and torch.all(a[4].bias == 0)
    assert torch.all(a[1].weight == 1) and torch.all(a[1].bias == 0)
    assert torch.all(a[1].running_mean == 0) and torch.all(a[1].running_var == 1)
    big = nn.Linear(1000, 400)
    randomize_module(big, "", block_generator(0, ""))
    assert big.weight.std().item() == pytest.approx(1 / np.sqrt(1000), rel=0.02)


def test_bn_running_stats_can_be_kept():
    a = small_net()
    a[1].running_mean.fill_(5.0)
    randomize_module(a, "1", block_generator(0, "1"), reset_bn_stats=False)
    assert torch.all(a[1].running_mean == 5.0)
    assert torch.all(a[1].weight == 1)


def test_block_generator_differs_by_name_and_seed():
    draw = lambda g: torch.rand(3, generator=g)  # noqa: E731
    assert torch.equal(draw(block_generator(0, "a")), draw(block_generator(0, "a")))
    assert not torch.equal(draw(block_generator(0, "a")), draw(block_generator(0, "b")))
    assert not torch.equal(draw(block_generator(0, "a")), draw(block_generator(1, "a")))


def test_randomization_flag_on_sequences():
    assert randomization_flag([1.0, 0.9, 0.7])  # final 0.7 >= 0.5: insensitive, fails
    assert not randomization_flag([1.0, 0.4, 0.1])
    assert randomization_flag([1.0, np.nan])  # cannot show a drop
    assert not randomization_flag([1.0, 0.7], threshold=0.8)


def test_long_rows_and_figures_of_a_curve(gradcam_cascade):
    df, _ = gradcam_cascade
    rows = curve_long_rows(df)
    assert len(rows) == 4 * len(df)
    assert rows[0]["label"] == "original" and rows[0]["x"] == 0.0
    assert {r["metric"] for r in rows} == {"spearman", "spearman_abs", "ssim", "hog_similarity"}
    last = [r for r in rows if r["step"] == len(DENSENET_CASCADE) and r["metric"] == "ssim"]
    assert last[0]["value"] == df.iloc[-1]["ssim"] and last[0]["label"] == "features.conv0"
    fig = randomization_figures(df)
    assert fig["randomization_final_spearman_abs"] == df.iloc[-1]["spearman_abs"]
