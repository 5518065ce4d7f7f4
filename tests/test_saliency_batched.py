"""The batch-level explanation (`audit.saliency.batched.explain_batch`) gives the maps of the
per-image path it replaced (`explain_all` on one image and its targets at a time), and its
logits are those of `model.logits`."""

from __future__ import annotations

import pytest
import torch

from audit.model import load_model
from audit.protocol import BASELINE_NAMES, METHOD_NAMES
from audit.saliency import explain_all, get_method
from audit.saliency._cam import logits_from_features
from audit.saliency.batched import explain_batch
from audit.saliency.integrated_gradients import CPU_CHUNK, auto_chunk

#: Tolerance relative to each map's largest magnitude. The batch path puts other images (and
#: IG path points of other pairs) in the same forward: convolution kernels chosen per batch
#: size sum in another order, so float32 rounding differs (measured below 1e-6 of the maximum;
#: test_saliency_real.py allows 1e-5 for the same reason). Caught all the same: a map taken
#: from another image or target, or a padded target leaking in (differences of order 1).
REL = 1e-5
NAMES = list(METHOD_NAMES) + list(BASELINE_NAMES)
OPTIONS = {"ig_steps": 4, "ig_internal_batch_size": 3, "seed": 0}


@pytest.fixture(scope="module")
def model():
    return load_model(random_init=True, seed=0, device="cpu")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    smooth = torch.nn.functional.avg_pool2d(torch.rand((4, 1, 96, 96), generator=g), 5, 1, 2)
    return smooth * 2048 - 1024


def _close(a: torch.Tensor, ref: torch.Tensor) -> bool:
    return (a - ref).abs().max().item() <= REL * max(ref.abs().max().item(), 1e-30)


def test_batch_maps_equal_the_per_image_path(model, images):
    # ragged: 2 targets, 1, none, 3 (with a repeat of another image's target)
    targets = [[0, 7], [10], [], [3, 0, 12]]
    batch = explain_batch(model, images, targets, NAMES, **OPTIONS)
    assert batch.logits.shape == (4, len(model.pathologies))
    for b, wanted in enumerate(targets):
        if not wanted:
            assert batch.results[b] == {}
            continue
        old = explain_all(model, images[b:b + 1], [wanted], NAMES, **OPTIONS)
        for name in NAMES:
            new = batch.results[b][name]
            assert new.maps.shape == old[name].maps.shape == (1, len(wanted), 96, 96), name
            for k in range(len(wanted)):
                assert _close(new.maps[0, k], old[name].maps[0, k]), (name, b, k)
            for key, value in old[name].extras.items():
                assert torch.allclose(new.extras[key], value, rtol=1e-4, atol=1e-4), (name, key)


def test_the_check_fails_on_a_map_of_another_target(model, images):
    batch = explain_batch(model, images[:2], [[0], [10]], ["gradcam", "integrated_gradients"],
                          **OPTIONS)
    wrong = explain_all(model, images[1:2], [[3]], ["gradcam", "integrated_gradients"],
                        **OPTIONS)
    for name in ("gradcam", "integrated_gradients"):
        assert not _close(batch.results[1][name].maps[0, 0], wrong[name].maps[0, 0]), name


def test_logits_come_from_the_same_forward_and_equal_model_logits(model, images):
    with torch.inference_mode():
        direct = model.logits(images)
        pooled = logits_from_features(model, model.features(images))
    assert torch.equal(pooled, direct)
    batch = explain_batch(model, images, [[0]] * 4, ["gradcam", "gradcampp"])
    assert torch.equal(batch.logits, direct)
    ig_only = explain_batch(model, images, [[0]] * 4, ["integrated_gradients"], **OPTIONS)
    assert torch.equal(ig_only.logits, direct)


def test_method_targets_restrict_one_method_and_keep_the_maps(model, images):
    targets = [[0, 7], [10], [3]]
    ig_targets = [[7], [], [3]]
    batch = explain_batch(model, images[:3], targets, ["gradcam", "integrated_gradients"],
                          method_targets={"integrated_gradients": ig_targets}, **OPTIONS)
    assert "integrated_gradients" not in batch.results[1]
    assert batch.map_index(0, "integrated_gradients", 7) == 0
    assert batch.map_index(0, "integrated_gradients", 0) is None
    assert batch.map_index(0, "gradcam", 7) == 1
    full = explain_batch(model, images[:3], targets, ["integrated_gradients"], **OPTIONS)
    assert _close(batch.results[0]["integrated_gradients"].maps[0, 0],
                  full.results[0]["integrated_gradients"].maps[0, 1])


def test_ig_pairs_equal_ig_on_the_gathered_images(model, images):
    ig = get_method("integrated_gradients", steps=3, internal_batch_size=4,
                    method="riemann_trapezoid", baseline="mean")
    index, target = torch.tensor([2, 0, 2]), torch.tensor([5, 1, 9])
    pairs = ig.explain_pairs(model, images, index, target)
    ref = ig.explain(model, images[index], target[:, None])
    assert _close(pairs.maps, ref.maps)
    for key, value in ref.extras.items():
        assert torch.allclose(pairs.extras[key], value, rtol=1e-4, atol=1e-4), key


def test_automatic_chunk_on_the_cpu_and_a_configured_one(model, images):
    assert auto_chunk(model, images, 1000, None) == CPU_CHUNK
    assert auto_chunk(model, images, 10, None) == 10
    assert auto_chunk(model, images, 1000, 7) == 7
