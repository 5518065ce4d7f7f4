"""Preprocessing: torchxrayvision intensity range, resize, and box geometry that matches it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audit.data.preprocess import (
    XRV_MAX,
    XRV_MIN,
    box_pixel_bounds,
    draw_box,
    preprocess,
    scale_boxes,
    to_xrv_range,
    unscale_boxes,
)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w)).astype(np.float32)


def test_output_is_a_224_tensor_spanning_the_xrv_range():
    out = preprocess(_image(1024, 1024))
    assert out.tensor.shape == (1, 224, 224) and out.tensor.dtype == torch.float32
    assert out.tensor.min().item() >= XRV_MIN and out.tensor.max().item() <= XRV_MAX
    assert (out.scale_x, out.scale_y, out.original_size, out.size) == (
        224 / 1024, 224 / 1024, (1024, 1024), (224, 224)
    )  # fmt: skip


def test_intensity_matches_torchxrayvision_normalize_for_full_range_8bit():
    # xrv.datasets.normalize(img, 255) = (2 * img / 255 - 1) * 1024 = img / 255 * 2048 - 1024
    img = _image(16, 16)
    img[0, 0], img[0, 1] = 0, 255
    expected = (2 * (img / 255.0) - 1.0) * 1024
    np.testing.assert_allclose(to_xrv_range(img), expected, atol=1e-3)
    np.testing.assert_allclose(preprocess(img, size=16).tensor[0].numpy(), expected, atol=1e-3)


def test_any_input_range_is_min_max_scaled_first():
    img = np.array([[0.25, 0.5], [0.75, 0.25]])  # e.g. a DICOM window output
    np.testing.assert_allclose(to_xrv_range(img), [[-1024, 0], [1024, -1024]])
    np.testing.assert_allclose(to_xrv_range(img * 30000 + 7), to_xrv_range(img), atol=1e-3)
    with pytest.raises(ValueError, match="constant"):
        to_xrv_range(np.full((4, 4), 3.0))


def test_scaling_is_the_float64_formula_to_the_bit_and_leaves_its_input_alone():
    """`to_xrv_range` scales in place in a float64 copy: the result must equal, bit for bit, the
    textbook expression evaluated with temporaries, and a float64 input must not change."""
    rng = np.random.default_rng(7)
    for img, value_range in ((rng.normal(size=(37, 53)) * 900 + 40, None),
                             (rng.integers(0, 256, size=(40, 30)).astype(np.float32), (0, 255)),
                             (rng.normal(size=(20, 20)), (-1.5, 0.5))):  # values outside: clipped
        before = img.copy()
        lo, hi = value_range or (float(img.min()), float(img.max()))
        unit = np.clip((img.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
        expected = (unit * 2048.0 + -1024.0).astype(np.float32)
        out = to_xrv_range(img, value_range)
        assert out.dtype == np.float32 and np.array_equal(out, expected)
        assert np.array_equal(img, before)


def test_preprocess_is_deterministic():
    img = _image(700, 500, seed=3)
    a, b = preprocess(img).tensor, preprocess(img).tensor
    assert torch.equal(a, b)


def test_non_square_sources_are_resized_not_cropped():
    out = preprocess(_image(600, 1000))
    assert out.original_size == (1000, 600)
    assert out.scale_x == pytest.approx(224 / 1000) and out.scale_y == pytest.approx(224 / 600)


@pytest.mark.parametrize(("h", "w"), [(1024, 1024), (600, 1000), (1955, 1841)])
def test_a_bright_rectangle_lands_on_its_scaled_box(h, w):
    """The image and its boxes are scaled by the same factors: the resized image's bright
    region matches the scaled box within one model pixel."""
    box = np.array([0.31 * w, 0.22 * h, 0.27 * w, 0.4 * h])
    img = np.zeros((h, w), dtype=np.float32)
    c0, r0, c1, r1 = box_pixel_bounds(box, (h, w))
    img[r0 : r1 + 1, c0 : c1 + 1] = 1.0
    out = preprocess(img)
    mask = out.tensor[0].numpy() > 0  # above the middle of [-1024, 1024]
    rows, cols = np.nonzero(mask)
    sx, sy, sw, sh = out.boxes_to_model(box)
    assert abs(cols.min() - sx) <= 1 and abs(cols.max() + 1 - (sx + sw)) <= 1
    assert abs(rows.min() - sy) <= 1 and abs(rows.max() + 1 - (sy + sh)) <= 1


def test_scale_boxes_hand_values_and_inverse():
    boxes = np.array([[100.0, 200.0, 50.0, 80.0], [0.0, 0.0, 1024.0, 512.0]])
    scaled = scale_boxes(boxes, (1024, 512), (224, 224))
    np.testing.assert_allclose(
        scaled, [[21.875, 87.5, 10.9375, 35.0], [0.0, 0.0, 224.0, 224.0]], rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(unscale_boxes(scaled, (1024, 512), (224, 224)), boxes, atol=1e-9)
    assert scale_boxes(boxes[0], (1024, 512), (224, 224)).shape == (4,)
    with pytest.raises(ValueError):
        scale_boxes(np.zeros((2, 3)), (1, 1), (1, 1))


def test_box_pixel_bounds_use_pixel_centres():
    assert box_pixel_bounds([0, 0, 1, 1], (10, 10)) == (0, 0, 0, 0)
    assert box_pixel_bounds([0.5, 0.5, 2.0, 1.0], (10, 10)) == (0, 0, 2, 1)
    assert box_pixel_bounds([0.6, 0.6, 0.8, 0.8], (10, 10)) is None  # no centre inside
    assert box_pixel_bounds([-5, -5, 100, 100], (10, 12)) == (0, 0, 11, 9)  # clipped


def test_draw_box_outlines_the_pixels_inside_the_box():
    img = draw_box(np.zeros((8, 10)), [2.0, 1.0, 5.0, 4.0], 1.0)  # columns 2..6, rows 1..4
    expected = np.zeros((8, 10))
    expected[1, 2:7] = expected[4, 2:7] = 1
    expected[1:5, 2] = expected[1:5, 6] = 1
    np.testing.assert_array_equal(img, expected)
    rgb = draw_box(np.zeros((8, 10, 3)), [2.0, 1.0, 5.0, 4.0], (255, 0, 0))
    np.testing.assert_array_equal(rgb[..., 0], expected * 255)


@pytest.mark.parametrize(("h", "w"), [(1024, 1024), (2048, 2500), (1955, 1841)])
def test_scaled_box_drawn_back_on_the_original_lands_on_the_original_box(h, w):
    rng = np.random.default_rng(h + w)
    for _ in range(20):
        x, y = rng.uniform(0, w * 0.7), rng.uniform(0, h * 0.7)
        box = np.array([x, y, rng.uniform(5, w - x), rng.uniform(5, h - y)])
        model_box = scale_boxes(box, (w, h), (224, 224))
        back = unscale_boxes(model_box, (w, h), (224, 224))
        drawn = draw_box(np.zeros((h, w), dtype=np.uint8), back, 1)
        rows, cols = np.nonzero(drawn)
        assert abs(cols.min() - box[0]) <= 1 and abs(cols.max() + 1 - (box[0] + box[2])) <= 1
        assert abs(rows.min() - box[1]) <= 1 and abs(rows.max() + 1 - (box[1] + box[3])) <= 1
        # And the box drawn at model resolution covers the same place, to one model pixel.
        small = draw_box(np.zeros((224, 224), dtype=np.uint8), model_box, 1)
        r, c = np.nonzero(small)
        sx, sy = 224 / w, 224 / h
        assert (
            abs(c.min() / sx - box[0]) <= 1 / sx
            and abs((c.max() + 1) / sx - box[0] - box[2]) <= 1 / sx
        )
        assert (
            abs(r.min() / sy - box[1]) <= 1 / sy
            and abs((r.max() + 1) / sy - box[1] - box[3]) <= 1 / sy
        )


def test_preprocess_settings_name_the_size():
    from audit.data.preprocess import preprocess_settings

    assert preprocess_settings(224)["size"] == 224
    assert preprocess_settings(224) != preprocess_settings(512)


def test_nominal_range_follows_torchxrayvision_normalize_for_8_bit_png() -> None:
    """An 8-bit image maps by 255 (xrv.datasets.normalize(img, 255)), not by its own min-max:
    an image whose brightest pixel is 200 keeps 200 -> 200/255*2048-1024."""
    import torchxrayvision as xrv

    from audit.data.preprocess import nominal_range, preprocess

    pixels = np.full((8, 8), 50.0, dtype=np.float32)
    pixels[2:4, 2:4] = 200.0
    meta = {"source_format": "png", "bits_stored": 8}
    assert nominal_range(pixels, meta) == (0.0, 255.0)
    out = preprocess(pixels, size=8, value_range=nominal_range(pixels, meta)).tensor[0].numpy()
    np.testing.assert_allclose(out, xrv.datasets.normalize(pixels, 255), rtol=0, atol=1e-3)
    windowed = {"source_format": "dicom", "voi": "window center=1 width=2", "bits_stored": 12}
    assert nominal_range(pixels / 255.0, windowed) == (0.0, 1.0)
    assert nominal_range(pixels * 100.0, meta) is None  # outside the nominal range: min-max
    sixteen = {"source_format": "png", "bits_stored": 16}
    assert nominal_range(pixels * 100.0, sixteen) == (0.0, 65535.0)
