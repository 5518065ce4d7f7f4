"""Readers: PNG modes, DICOM display pipeline, rejections, decompression bombs, PHI."""

from __future__ import annotations

import logging
import warnings

import hostile
import numpy as np
import pytest

from audit.data import dicom as dcm
from audit.data import dicom_pixels as pix
from audit.data.decoded import check_not_empty
from audit.data.readers import (
    DecodedImage,
    RejectedInput,
    decode_bytes,
    read_image,
    sniff_format,
)

# ------------------------------------------------------------------------------------------
# PNG
# ------------------------------------------------------------------------------------------
PNG_BUILDERS = {
    "L": hostile.png_gray8,
    "I;16": hostile.png_gray16,
    "RGB": hostile.png_rgb,
    "RGBA": hostile.png_rgba,
    "LA": hostile.png_la,
    "P": hostile.png_palette,
}


@pytest.mark.parametrize("mode", sorted(PNG_BUILDERS))
def test_every_png_mode_decodes_to_float32_gray_2d(tmp_path, mode):
    image = read_image(PNG_BUILDERS[mode](tmp_path / "x.png"))
    assert isinstance(image, DecodedImage)
    assert image.pixels.dtype == np.float32 and image.pixels.shape == (64, 48)
    assert image.meta["source_format"] == "png"
    assert image.meta["photometric"] == mode
    assert (image.meta["width"], image.meta["height"]) == (48, 64)
    assert image.meta["pixel_spacing"] is None


def test_rgba_png_uses_colour_channels_and_ignores_alpha(tmp_path):
    image = read_image(hostile.png_rgba(tmp_path / "x.png"))
    np.testing.assert_array_equal(image.pixels, hostile.gradient())
    assert "alpha channel ignored" in image.meta["warnings"]


def test_la_png_uses_the_luminance_channel(tmp_path):
    image = read_image(hostile.png_la(tmp_path / "x.png"))
    np.testing.assert_array_equal(image.pixels, hostile.gradient())


def test_palette_png_is_mapped_through_its_palette(tmp_path):
    image = read_image(hostile.png_palette(tmp_path / "x.png"))
    np.testing.assert_array_equal(image.pixels, 255 - hostile.gradient())


def test_16bit_png_keeps_its_full_range(tmp_path):
    image = read_image(hostile.png_gray16(tmp_path / "x.png"))
    np.testing.assert_array_equal(image.pixels, hostile.gradient(maxval=60000))
    assert image.pixels.max() > 255 and image.meta["bits_stored"] == 16


def test_rgb_png_becomes_bt601_luma(tmp_path):
    from PIL import Image

    path = hostile.png_rgb(tmp_path / "x.png")
    rgb = np.asarray(Image.open(path)).astype(np.float64)
    expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    np.testing.assert_allclose(read_image(path).pixels, expected, atol=1e-3)


def test_png_bomb_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
    path = hostile.png_bomb(tmp_path / "bomb.png")
    assert path.stat().st_size < 200  # declares 400 MP in a tiny file

    def no_pillow(*args, **kwargs):
        raise AssertionError("Pillow must not be reached for a declared bomb")

    monkeypatch.setattr("audit.data.png.PngImagePlugin.PngImageFile", no_pillow)
    with pytest.raises(RejectedInput, match=r"image too large: declared 20000x20000"):
        read_image(path)


def test_only_our_pixel_limit_applies_to_a_png_and_decoding_leaves_warnings_alone(
        tmp_path, monkeypatch):
    # Pillow's global limit, shrunk below this 48 x 64 image: Image.open would refuse it
    # (DecompressionBombError above twice the limit); the decoder must not consult it, nor
    # touch the process-wide warnings filters (batches decode in threads).
    monkeypatch.setattr("PIL.Image.MAX_IMAGE_PIXELS", 100)
    path = hostile.png_gray8(tmp_path / "x.png")
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inner = list(warnings.filters)
        assert read_image(path).pixels.shape == (64, 48)
        assert warnings.filters == inner
    assert caught == [] and warnings.filters == filters


def test_pixel_limit_is_configurable(tmp_path):
    path = hostile.png_gray8(tmp_path / "x.png")
    assert read_image(path, max_pixels=48 * 64).pixels.shape == (64, 48)
    with pytest.raises(RejectedInput, match="image too large"):
        read_image(path, max_pixels=48 * 64 - 1)
    with pytest.raises(RejectedInput, match="image too large"):
        read_image(hostile.dicom_cr(tmp_path / "x.dcm"), max_pixels=100)


def test_sniffing_uses_content_not_extension(tmp_path):
    png = hostile.png_gray8(tmp_path / "image.dcm")  # a PNG with a DICOM name
    dicom = hostile.dicom_cr(tmp_path / "image.png")  # and the reverse
    assert read_image(png).meta["source_format"] == "png"
    assert read_image(dicom).meta["source_format"] == "dicom"
    assert sniff_format(b"\x89PNG\r\n\x1a\n" + b"\0" * 200) == "png"
    assert sniff_format(b"\0" * 128 + b"DICM") == "dicom"
    assert sniff_format(b"DICM" + b"\0" * 200) is None  # no preamble: not Part 10


# ------------------------------------------------------------------------------------------
# Rejections: always RejectedInput, always a specific reason
# ------------------------------------------------------------------------------------------
REJECTS = [
    (hostile.png_truncated, "x.png", "truncated PNG"),
    (hostile.png_constant, "x.png", "empty decode: image is all zero"),
    (lambda p: hostile.png_constant(p, 77), "x.png", "empty decode: image is constant"),
    (hostile.jpeg_named_png, "x.png", "not a PNG or DICOM file: content is JPEG"),
    (hostile.dicom_truncated, "x.dcm", "truncated DICOM"),
    (hostile.text_named_dcm, "x.dcm", "not a PNG or DICOM file"),
    (hostile.dicom_sr, "x.dcm", "unsupported DICOM object: Basic Text SR Storage"),
    (hostile.dicom_no_pixels, "x.dcm", "DICOM without pixel data"),
    (hostile.dicom_huge_header, "x.dcm", "image too large: declared 20000x20000"),
    (
        lambda p: hostile.dicom_cr(p, sop_class="1.2.840.10008.5.1.4.1.1.2"),
        "x.dcm",
        "unsupported DICOM object: CT Image Storage",
    ),
    (lambda p: p.write_bytes(b""), "x.dcm", "empty file"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\0\0"), "x.png", "truncated PNG"),
]


@pytest.mark.parametrize(("build", "name", "reason"), REJECTS, ids=[r[2] for r in REJECTS])
def test_bad_input_is_rejected_with_a_specific_reason(tmp_path, build, name, reason):
    path = tmp_path / name
    build(path)
    with pytest.raises(RejectedInput) as info:
        read_image(path)
    assert info.value.reason.startswith(reason), info.value.reason
    assert str(info.value) == info.value.reason


def test_missing_file_and_directory_are_rejected(tmp_path):
    with pytest.raises(RejectedInput, match="cannot read file"):
        read_image(tmp_path / "absent.png")
    with pytest.raises(RejectedInput, match="not a file"):
        read_image(tmp_path)


def test_huge_dicom_header_is_refused_before_pixel_data_is_read(tmp_path, monkeypatch):
    import pydicom

    calls = []
    real = pydicom.dcmread

    def spy(*args, **kwargs):
        calls.append(kwargs.get("stop_before_pixels", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", spy)
    with pytest.raises(RejectedInput, match="image too large"):
        read_image(hostile.dicom_huge_header(tmp_path / "x.dcm"))
    assert calls == [True]


@pytest.mark.parametrize(
    "sop_class",
    [
        hostile.CR_STORAGE,
        hostile.DX_PRESENTATION,
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX for processing
        hostile.SC_STORAGE,
        hostile.SC_MULTIFRAME_BYTE,
    ],
)
def test_radiograph_sop_classes_are_accepted(tmp_path, sop_class):
    image = read_image(hostile.dicom_cr(tmp_path / "x.dcm", sop_class=sop_class))
    assert image.meta["sop_class"] == dcm.ALLOWED_SOP_CLASSES[sop_class]


def test_fuzzed_files_raise_nothing_but_rejected_input(tmp_path):
    """Truncated and byte-flipped PNG/DICOM files: decoded or RejectedInput, nothing else."""
    rng = np.random.default_rng(0)
    sources = [
        hostile.png_gray8(tmp_path / "a.png").read_bytes(),
        hostile.png_rgba(tmp_path / "b.png").read_bytes(),
        hostile.dicom_cr(tmp_path / "c.dcm").read_bytes(),
        hostile.dicom_mono1_12bit(tmp_path / "d.dcm").read_bytes(),
    ]
    outcomes = {"decoded": 0, "rejected": 0}
    for data in sources:
        for _ in range(40):
            buf = bytearray(data)
            if rng.random() < 0.5:
                buf = buf[: int(rng.integers(0, len(buf)))]
            else:
                start = 128 if buf[128:132] == b"DICM" else 8
                for pos in rng.integers(start, len(buf), size=int(rng.integers(1, 8))):
                    buf[pos] = int(rng.integers(0, 256))
            try:
                image = decode_bytes(bytes(buf))
                assert image.pixels.ndim == 2 and image.pixels.dtype == np.float32
                outcomes["decoded"] += 1
            except RejectedInput as e:
                assert e.reason
                outcomes["rejected"] += 1
    assert outcomes["rejected"] > 0


# ------------------------------------------------------------------------------------------
# DICOM display pipeline: stored -> Modality LUT -> VOI -> polarity (hand-computed values)
# ------------------------------------------------------------------------------------------
def test_rescale_then_first_window_then_monochrome1_inversion_hand_values():
    # stored 1000 -> 2*1000 - 1024 = 976 (modality units); window c=1000, w=2001, LINEAR:
    # bounds c - 0.5 -+ (w - 1)/2 = [-0.5, 1999.5]; y = (976 - 999.5)/2000 + 0.5 = 0.48825;
    # MONOCHROME1 over the window's [0, 1]: 1 - 0.48825 = 0.51175.
    # stored 600 -> 176 -> 0.08825 -> 0.91175; 1200 -> 1376 -> 0.68825 -> 0.31175;
    # 0 -> -1024 (below) -> 0 -> 1; 2000 and 4095 -> above -> 1 -> 0.
    params = pix.GrayscaleParams(
        photometric="MONOCHROME1",
        rescale_slope=hostile.MONO1_SLOPE,
        rescale_intercept=hostile.MONO1_INTERCEPT,
        windows=hostile.MONO1_WINDOWS,
    )
    values, info = pix.grayscale_pipeline(hostile.MONO1_STORED, params)
    np.testing.assert_allclose(values, hostile.MONO1_EXPECTED, atol=1e-12)
    assert info["voi"] == "window center=1000 width=2001 LINEAR (1 of 2)"
    assert info["inverted"] is True
    assert "2 VOI windows in header: used the first" in info["warnings"]


def test_window_is_applied_to_modality_values_not_stored_values():
    # Windowing the stored 1000 directly would give (1000 - 999.5)/2000 + 0.5 = 0.50025.
    params = pix.GrayscaleParams(
        rescale_slope=2.0, rescale_intercept=-1024.0, windows=((1000, 2001),)
    )
    values, _ = pix.grayscale_pipeline(np.array([1000]), params)
    assert values[0] == pytest.approx(0.48825)
    assert values[0] != pytest.approx(0.50025)


def test_linear_window_follows_the_standard_formula():
    # c=100, w=101: y = 0 at x <= 49.5, 1 above 149.5, ((x - 99.5)/100 + 0.5) between.
    x = np.array([0.0, 49.5, 74.5, 99.5, 149.5, 150.0])
    np.testing.assert_allclose(pix.window(x, 100, 101), [0, 0, 0.25, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(pix.window(x, 100, 101, out_range=(0, 255))[3], 127.5)


def test_linear_exact_and_sigmoid_windows():
    x = np.array([40.0, 50.0, 75.0, 100.0, 150.0, 160.0])
    np.testing.assert_allclose(pix.window(x, 100, 100, "LINEAR_EXACT"), [0, 0, 0.25, 0.5, 1.0, 1.0])
    y = pix.window(x, 100, 100, "SIGMOID")
    assert y[3] == pytest.approx(0.5) and y[4] == pytest.approx(1 / (1 + np.exp(-2)))


def test_modality_lut_sequence_replaces_rescale():
    lut = pix.Lut(first_mapped=10, data=np.array([100.0, 200.0, 300.0]), bits=16)
    params = pix.GrayscaleParams(rescale_slope=5.0, modality_lut=lut)
    values, info = pix.grayscale_pipeline(np.array([5, 10, 11, 12, 50]), params)
    np.testing.assert_array_equal(values, [100, 100, 200, 300, 300])
    assert info["modality_lut"] == "modality LUT sequence"


def test_voi_lut_is_preferred_and_monochrome1_inverts_over_the_lut_range():
    voi = pix.Lut(first_mapped=0, data=np.array([0.0, 10.0, 255.0]), bits=8)
    params = pix.GrayscaleParams(photometric="MONOCHROME1", voi_luts=(voi,), windows=((1, 1),))
    values, info = pix.grayscale_pipeline(np.array([0, 1, 2]), params)
    np.testing.assert_array_equal(values, [255, 245, 0])
    assert info["voi"] == "VOI LUT 1 of 1"


def test_without_voi_monochrome1_inverts_over_the_actual_range():
    params = pix.GrayscaleParams(photometric="MONOCHROME1")
    values, info = pix.grayscale_pipeline(np.array([10, 20, 30]), params)
    np.testing.assert_array_equal(values, [30, 20, 10])
    assert info["voi"] == "none"


def test_presentation_lut_shape_inverse_inverts_monochrome2():
    params = pix.GrayscaleParams(presentation_lut_shape="INVERSE", windows=((100, 101),))
    values, info = pix.grayscale_pipeline(np.array([74.5]), params)
    assert values[0] == pytest.approx(0.75) and info["inverted"] is True


def test_invalid_window_width_is_skipped_with_a_warning():
    params = pix.GrayscaleParams(windows=((100, 0),))
    values, info = pix.grayscale_pipeline(np.array([1, 2]), params)
    np.testing.assert_array_equal(values, [1, 2])
    assert any("invalid VOI window" in w for w in info["warnings"])


def test_monochrome1_12bit_file_end_to_end(tmp_path):
    image = read_image(hostile.dicom_mono1_12bit(tmp_path / "x.dcm"))
    np.testing.assert_allclose(image.pixels[0], hostile.MONO1_EXPECTED, atol=1e-6)
    meta = image.meta
    assert meta["bits_stored"] == 12 and meta["photometric"] == "MONOCHROME1"
    assert meta["voi"] == "window center=1000 width=2001 LINEAR (1 of 2)"
    assert meta["modality_lut"] == "rescale slope=2 intercept=-1024"
    assert meta["inverted"] is True and meta["pixel_spacing"] == 0.2
    assert "2 VOI windows in header: used the first" in meta["warnings"]


@pytest.mark.parametrize("bits", [12, 15, 16])
def test_monochrome1_and_monochrome2_twins_are_inverse_images(tmp_path, bits):
    stored = hostile.gradient(maxval=2**bits - 1)
    mono2 = read_image(hostile.dicom_cr(tmp_path / "a.dcm", stored, bits_stored=bits)).pixels
    mono1 = read_image(
        hostile.dicom_cr(tmp_path / "b.dcm", stored, bits_stored=bits, photometric="MONOCHROME1")
    ).pixels
    np.testing.assert_array_equal(mono2, stored)
    assert np.corrcoef(mono1.ravel(), mono2.ravel())[0, 1] < -0.9999


def test_multiframe_dicom_gives_frame_zero_and_a_warning(tmp_path):
    image = read_image(hostile.dicom_multiframe(tmp_path / "x.dcm"))
    np.testing.assert_array_equal(image.pixels, hostile.gradient())
    assert image.meta["n_frames"] == 3
    assert "multi-frame DICOM (3 frames): frame 0 used" in image.meta["warnings"]


def test_pixel_spacing_falls_back_to_imager_spacing_and_zero_is_unknown(tmp_path):
    both = read_image(
        hostile.dicom_cr(tmp_path / "a.dcm", PixelSpacing=[0.1, 0.1], ImagerPixelSpacing=[0.2, 0.2])
    )
    imager = read_image(hostile.dicom_cr(tmp_path / "b.dcm", ImagerPixelSpacing=[0.15, 0.15]))
    zero = read_image(hostile.dicom_cr(tmp_path / "c.dcm", PixelSpacing=[0, 0]))
    aniso = read_image(hostile.dicom_cr(tmp_path / "d.dcm", PixelSpacing=[0.1, 0.2]))
    assert (both.meta["pixel_spacing"], both.meta["pixel_spacing_source"]) == (0.1, "PixelSpacing")
    assert imager.meta["pixel_spacing"] == 0.15
    assert imager.meta["pixel_spacing_source"] == "ImagerPixelSpacing"
    assert zero.meta["pixel_spacing"] is None and zero.meta["pixel_spacing_source"] is None
    assert aniso.meta["pixel_spacing"] is None and aniso.meta["pixel_spacing_rc"] == [0.1, 0.2]


# ------------------------------------------------------------------------------------------
# PHI: nothing from identifying header fields leaves the reader
# ------------------------------------------------------------------------------------------
META_KEYS = {
    "source_format", "width", "height", "photometric", "pixel_spacing", "pixel_spacing_rc",
    "pixel_spacing_source", "bits_stored", "bits_allocated", "samples_per_pixel", "n_frames",
    "transfer_syntax", "transfer_syntax_name", "sop_class", "modality", "modality_lut", "voi",
    "inverted", "warnings",
}  # fmt: skip


def test_phi_dicom_is_read_without_copying_any_identifier(tmp_path, caplog, capfd):
    path = hostile.write_phi_dicom(tmp_path / "phi.dcm")
    assert path.read_bytes().count(hostile.SENTINEL_BYTES) >= len(hostile.PHI_KEYWORDS)
    with caplog.at_level(logging.DEBUG):
        image = read_image(path)
    assert set(image.meta) <= META_KEYS
    assert "SENTINEL" not in repr(image.meta)
    assert image.meta["modality"] == "CR"
    assert "SENTINEL" not in caplog.text
    out, err = capfd.readouterr()
    assert "SENTINEL" not in out + err


@pytest.mark.parametrize("variant", ["sr", "truncated", "huge", "bad_photometric"])
def test_rejected_phi_dicom_does_not_leak_into_the_reason(tmp_path, caplog, variant):
    path = tmp_path / "phi.dcm"
    if variant == "sr":
        hostile.write_phi_dicom(path, sop_class=hostile.BASIC_TEXT_SR)
    else:
        hostile.write_phi_dicom(path)
        import pydicom

        ds = pydicom.dcmread(path)
        if variant == "huge":
            ds.Rows = ds.Columns = 30000
            ds.save_as(path)
        elif variant == "bad_photometric":
            with dcm.quiet_pydicom():  # pydicom would warn, quoting the value
                ds.PhotometricInterpretation = "SENTINEL^PHI"
                ds.save_as(path)
        else:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) - 500])
    caplog.clear()  # pydicom itself logs the sentinel while the test writes the bad value
    with caplog.at_level(logging.DEBUG), pytest.raises(RejectedInput) as info:
        read_image(path)
    err = info.value
    assert "SENTINEL" not in str(err) and "SENTINEL" not in repr(err.args)
    # No chained decoder exception (whose message could quote the header) travels with it.
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    assert "SENTINEL" not in caplog.text


def test_unknown_modality_text_is_not_copied(tmp_path):
    image = read_image(hostile.dicom_cr(tmp_path / "x.dcm", Modality="JD"))
    assert image.meta["modality"] is None


@pytest.mark.parametrize(("pixels", "reason"), [
    (np.array([[1.0, np.nan], [2.0, 3.0]]), "non-finite"),
    (np.full((3, 3), np.nan), "non-finite"),
    (np.array([[1.0, np.inf], [2.0, 3.0]]), "non-finite"),
    (np.array([[-np.inf, 1.0], [2.0, 3.0]]), "non-finite"),
    (np.zeros((3, 3)), "image is all zero"),
    (np.full((3, 3), 5.0), "image is constant"),
    (np.zeros((0, 4)), "array of shape"),
])
def test_check_not_empty_names_each_kind_of_empty_decode(pixels: np.ndarray, reason: str) -> None:
    with pytest.raises(RejectedInput, match=reason):
        check_not_empty(pixels.astype(np.float32))
    check_not_empty(np.array([[0.0, 1.0]], dtype=np.float32))  # two values: an image
