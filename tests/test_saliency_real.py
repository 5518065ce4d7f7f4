"""Every saliency method on real NIH ChestX-ray14 images (224 px, torchxrayvision range):
right shapes, finite, non-negative where the method says so, bit-identical run to run on CPU."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from audit.model import load_model
from audit.saliency import BASELINE_NAMES, METHOD_NAMES, explain_all, get_method

IMAGES = ("00013118_008.png", "00014716_007.png")  # Atelectasis boxes in the development half


pytestmark = pytest.mark.usefixtures("torch_threads")  # every test under 1 and 2 threads


def _load(path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    try:
        from audit.data.preprocess import preprocess
    except ImportError:  # inline fallback: min-max to [-1024, 1024], bilinear to 224
        scaled = (pixels - pixels.min()) / (pixels.max() - pixels.min()) * 2048 - 1024
        t = torch.from_numpy(scaled)[None, None]
        return torch.nn.functional.interpolate(t, size=(224, 224), mode="bilinear",
                                               antialias=True)[0]
    return preprocess(pixels, size=224).tensor


@pytest.fixture(scope="module")
def batch(nih_dev_dir):
    x = torch.stack([_load(nih_dev_dir / "images" / name) for name in IMAGES])
    with open(nih_dev_dir / "BBox_List_2017_dev.csv", newline="") as fh:
        findings = {row[0]: row[1] for row in csv.reader(fh) if row and row[0] in IMAGES}
    return x, [findings[name] for name in IMAGES]


@pytest.fixture(scope="module")
def model():
    return load_model(random_init=True, seed=0, device="cpu")


def test_real_images_are_in_the_xrv_range(batch):
    x, findings = batch
    assert x.shape == (2, 1, 224, 224) and x.dtype == torch.float32
    assert x.min() >= -1024 and x.max() <= 1024 and x.max() - x.min() > 1500
    assert findings == ["Atelectasis", "Atelectasis"]


def test_every_method_on_real_images_is_finite_shaped_and_bit_identical_run_to_run(model, batch):
    x, findings = batch
    box_target = model.finding_index("Atelectasis")
    targets = torch.tensor([[box_target, model.finding_index("Effusion")],
                            [box_target, model.finding_index("Infiltrate")]])
    names = list(METHOD_NAMES) + list(BASELINE_NAMES)
    options = {"ig_steps": 3, "ig_internal_batch_size": 3, "seed": 0}
    first = explain_all(model, x, targets, names, **options)
    second = explain_all(model, x, targets, names, **options)
    for name in names:
        res = first[name]
        assert res.maps.shape == (2, 2, 224, 224) and res.maps.dtype == torch.float32, name
        assert torch.isfinite(res.maps).all() and torch.isfinite(res.raw).all(), name
        if get_method(name).non_negative:
            assert (res.maps >= 0).all() and (res.raw >= 0).all(), name
        assert torch.equal(res.maps, second[name].maps), name
        assert torch.equal(res.raw, second[name].raw), name
        for key, value in res.extras.items():
            assert value.shape == (2, 2) and torch.equal(value, second[name].extras[key])
    for name in ("gradcam", "gradcampp"):
        assert first[name].raw.shape == (2, 2, 7, 7)
        assert first[name].maps.amax(dim=(-2, -1)).min() > 0, name  # not all-zero maps
    ig = first["integrated_gradients"]
    assert set(ig.extras) >= {"completeness_gap", "delta_f"}
    assert (ig.maps < 0).any() and (ig.maps > 0).any()  # signed attributions


def test_the_same_map_whatever_the_batch_it_was_explained_in(model, batch):
    x, _ = batch
    targets = torch.tensor([[0, 7], [10, 3]])
    both = explain_all(model, x, targets, ["gradcam", "gradcampp"])
    alone = explain_all(model, x[1:], targets[1:], ["gradcam", "gradcampp"])
    for name in both:
        # Relative to the map's maximum (9.6 for Grad-CAM, ~160 for Grad-CAM++ here): a batch of
        # 2 and a batch of 1 may take other convolution kernels, whose summation order differs
        # by float32 rounding (measured 2.4e-7 of the maximum). Still caught: a map taken from
        # the other image or target (O(1)), batch statistics leaking into eval mode (> 1e-2).
        a, b = both[name].maps[1], alone[name].maps[0]
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item(), name
