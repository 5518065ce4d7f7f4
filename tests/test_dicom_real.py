"""The real chest DICOMs in ../shared/data/dicom (skipped when ../shared is absent)."""

from __future__ import annotations

import numpy as np
import pytest

from audit.data.readers import read_image

FILES = {
    "google_dx": "nih_cxr14_google_DX_",
    "siim_mono2": "siim_acr_CR_MONO2_",
    "siim_fake_mono1": "siim_acr_FAKE_MONO1_",
    "rg1_j2k": "nema_wg04_RG1_CR_chest_MONO1_JPEG2000",
    "rg1_jls": "nema_wg04_RG1_CR_chest_MONO1_JPEGLS",
}
EXPECTED = {  # name: (width, height, photometric, bits stored, transfer syntax UID)
    "google_dx": (1024, 1024, "MONOCHROME2", 8, "1.2.840.10008.1.2"),
    "siim_mono2": (1024, 1024, "MONOCHROME2", 8, "1.2.840.10008.1.2.4.50"),
    "siim_fake_mono1": (1024, 1024, "MONOCHROME1", 8, "1.2.840.10008.1.2.4.50"),
    "rg1_j2k": (1841, 1955, "MONOCHROME1", 15, "1.2.840.10008.1.2.4.91"),
    "rg1_jls": (1841, 1955, "MONOCHROME1", 15, "1.2.840.10008.1.2.4.81"),
}


@pytest.fixture(scope="module")
def decoded(dicom_dir):
    out = {}
    for name, prefix in FILES.items():
        (path,) = sorted(dicom_dir.glob(prefix + "*.dcm"))
        out[name] = read_image(path)
    return out


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


@pytest.mark.parametrize("name", sorted(FILES))
def test_real_dicom_decodes_with_its_header_facts(decoded, name):
    image = decoded[name]
    width, height, photometric, bits, syntax = EXPECTED[name]
    assert image.pixels.dtype == np.float32 and image.pixels.shape == (height, width)
    assert image.pixels.std() > 0
    meta = image.meta
    assert (meta["width"], meta["height"]) == (width, height)
    assert meta["photometric"] == photometric and meta["bits_stored"] == bits
    assert meta["transfer_syntax"] == syntax and meta["source_format"] == "dicom"
    assert meta["inverted"] is (photometric == "MONOCHROME1")


def test_fake_monochrome1_decodes_to_the_inverse_of_its_monochrome2_twin(decoded):
    assert _corr(decoded["siim_fake_mono1"].pixels, decoded["siim_mono2"].pixels) < -0.99


def test_jpeg2000_and_jpegls_encodings_of_rg1_agree(decoded):
    assert _corr(decoded["rg1_j2k"].pixels, decoded["rg1_jls"].pixels) > 0.99


def test_rg1_window_is_recorded_and_zero_spacing_is_unknown(decoded):
    for name in ("rg1_j2k", "rg1_jls"):
        meta = decoded[name].meta
        assert meta["pixel_spacing"] is None  # the header says 0\0
        assert meta["voi"] == "window center=15000 width=30000 LINEAR (1 of 1)"
        assert any("pixel spacing unknown" in w for w in meta["warnings"])
    assert decoded["siim_mono2"].meta["pixel_spacing"] == pytest.approx(0.168)


@pytest.mark.parametrize("name", ["google_dx", "siim_mono2", "rg1_j2k", "rg1_jls"])
def test_bone_is_bright_mediastinum_brighter_than_lungs(decoded, name):
    """True monochrome images (MONOCHROME1 inverted) show the mediastinum brighter than the
    lung fields. (The FAKE_MONO1 file is MONOCHROME2 pixels with a MONOCHROME1 tag, so it must
    come out the other way round -- see the twin test.)"""
    p = decoded[name].pixels
    h, w = p.shape
    band = p[h // 3 : 2 * h // 3]
    centre = band[:, int(w * 0.45) : int(w * 0.55)].mean()
    lungs = np.r_[
        band[:, int(w * 0.2) : int(w * 0.35)].ravel(), band[:, int(w * 0.65) : int(w * 0.8)].ravel()
    ].mean()
    assert centre > lungs
