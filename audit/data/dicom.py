"""DICOM decoding for radiographs (CR, DX, Secondary Capture) with the display pipeline of a
trusted viewer.

Order of operations for grayscale images (PS3.3 C.11, PS3.4 N.2):

1. stored values (frame 0; pydicom applies Bits Stored / Pixel Representation),
2. Modality LUT: the Modality LUT Sequence when present, else Rescale Slope / Intercept,
3. VOI: the first VOI LUT Sequence item when present, else the first Window Center / Width pair
   (function LINEAR, LINEAR_EXACT or SIGMOID), else nothing; when the header offers several, the
   first is used and the choice is recorded in ``meta["voi"]``,
4. polarity: MONOCHROME1 (or Presentation LUT Shape INVERSE) is inverted over the output range
   of step 3 (``[0, 1]`` after a window, ``[0, 2**bits - 1]`` after a VOI LUT, the image's actual
   ``[min, max]`` when there is no VOI), so bone is bright for both photometrics.

Colour Secondary Captures (RGB, YBR, palette) become BT.601 luma.

Files are parsed in two steps: the header (``stop_before_pixels``) is checked first -- SOP Class,
Rows x Columns against the pixel limit, transfer syntax decodability -- and only then is the pixel
data read and frame 0 decoded. Nothing from the header other than whitelisted technical values
(sizes, bit depths, UIDs that name standard classes and syntaxes, spacings, window numbers) reaches
``meta`` or a rejection reason. pydicom's own warnings and log records, which can quote header
values, are silenced while a file is read.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from audit.data.decoded import (
    DEFAULT_MAX_PIXELS,
    DICOM_MAGIC,
    DICOM_MAGIC_OFFSET,
    DecodedImage,
    RejectedInput,
    rgb_to_gray,
)
from audit.data.dicom_pixels import (
    VOI_FUNCTIONS,
    GrayscaleParams,
    Lut,
    grayscale_pipeline,
)

ALLOWED_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
}
"""SOP Classes accepted: CR, DX (for presentation and for processing), Secondary Capture."""

GRAY_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
COLOR_PHOTOMETRICS = (
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_PARTIAL_420",
    "YBR_ICT",
    "YBR_RCT",
    "PALETTE COLOR",
)
MAX_SANE_SPACING_MM = 10.0

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
KNOWN_MODALITIES = frozenset({"CR", "DX", "RG", "PX", "IO", "MG", "XA", "RF", "DF", "OT", "DOC"})
"""Modality codes copied into meta; any other value (free text in a bad header) becomes None."""


# --------------------------------------------------------------------------------------------
# Header parsing
# --------------------------------------------------------------------------------------------
_QUIET_LOGGERS = ("pydicom", "pylibjpeg", "libjpeg", "openjpeg")


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's (and its decoders') warnings and log records: they can quote header
    values. Every logger of those packages is disabled, not only the parent, because records
    of a child logger would otherwise still reach the root handlers."""
    import pydicom.pixels  # noqa: F401 - create the package's loggers before silencing them

    names = {n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in _QUIET_LOGGERS}
    loggers = [logging.getLogger(n) for n in sorted(names | set(_QUIET_LOGGERS))]
    states = [(lg, lg.disabled) for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, was_disabled in states:
            lg.disabled = was_disabled


def _safe_uid(value: object) -> str | None:
    text = str(value) if value is not None else ""
    return text if len(text) <= 64 and _UID_RE.match(text) else None


def describe_sop_class(uid: object) -> str:
    """A header-safe description of a SOP Class UID (dictionary name or the numeric UID)."""
    from pydicom.uid import UID_dictionary

    safe = _safe_uid(uid)
    if safe is None:
        return "an invalid SOP Class UID"
    if safe in UID_dictionary:
        return f"{UID_dictionary[safe][0]} ({safe})"
    return f"unknown SOP Class {safe}"


def _floats(value: object) -> list[float]:
    if value is None or value == "":
        return []
    items = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    out = []
    for v in items:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            return []
    return out


def _lut_from_item(item, signed: bool) -> Lut:  # noqa: ANN001 - pydicom Dataset
    desc = [int(v) for v in item.LUTDescriptor]
    n_entries = desc[0] or 65536
    first = desc[1]
    if signed and first >= 32768:  # US/SS ambiguity of the descriptor's second value
        first -= 65536
    bits = desc[2]
    raw = item.LUTData
    if isinstance(raw, bytes | bytearray):
        data = np.frombuffer(raw, dtype="<u2")[:n_entries]
    else:
        data = np.asarray(raw if isinstance(raw, Sequence) else [raw], dtype=np.int64)
    if len(data) == 0:
        raise ValueError("empty LUT")
    if not 1 <= bits <= 16:
        raise ValueError("LUT bits out of range")
    return Lut(first_mapped=first, data=data.astype(np.float64), bits=bits)


def grayscale_params(ds) -> tuple[GrayscaleParams, list[str]]:  # noqa: ANN001
    """Extract `GrayscaleParams` from a dataset; header oddities become warnings."""
    warn: list[str] = []
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    modality_lut = None
    if ds.get("ModalityLUTSequence"):
        try:
            modality_lut = _lut_from_item(ds.ModalityLUTSequence[0], signed)
        except Exception:  # noqa: BLE001
            warn.append("unusable Modality LUT Sequence: ignored")
    slope = _floats(ds.get("RescaleSlope"))
    intercept = _floats(ds.get("RescaleIntercept"))
    slope_v = slope[0] if slope and math.isfinite(slope[0]) and slope[0] != 0 else 1.0
    if slope and slope_v != slope[0]:
        warn.append("invalid Rescale Slope: 1 used")
    icpt_v = intercept[0] if intercept and math.isfinite(intercept[0]) else 0.0

    voi_luts: list[Lut] = []
    for item in ds.get("VOILUTSequence") or []:
        try:
            voi_luts.append(_lut_from_item(item, signed))
        except Exception:  # noqa: BLE001
            warn.append("unusable VOI LUT item: ignored")
    centers = _floats(ds.get("WindowCenter"))
    widths = _floats(ds.get("WindowWidth"))
    windows = tuple((c, w) for c, w in zip(centers, widths, strict=False) if math.isfinite(c * w))
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if function not in VOI_FUNCTIONS:
        warn.append("unknown VOI LUT Function: LINEAR used")
        function = "LINEAR"
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    params = GrayscaleParams(
        photometric=str(ds.PhotometricInterpretation).strip().upper(),
        rescale_slope=slope_v,
        rescale_intercept=icpt_v,
        modality_lut=modality_lut,
        voi_luts=tuple(voi_luts),
        windows=windows,
        voi_function=function,
        presentation_lut_shape=shape if shape in ("IDENTITY", "INVERSE") else None,
    )
    return params, warn


def pixel_spacing(ds) -> tuple[tuple[float, float] | None, str | None]:  # noqa: ANN001
    """(row, column) spacing in mm from PixelSpacing, else ImagerPixelSpacing; None if not sane.

    Returns the spacing and the attribute it came from (``None`` when unknown).
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        values = _floats(ds.get(keyword))
        if len(values) == 2 and all(
            math.isfinite(v) and 0 < v <= MAX_SANE_SPACING_MM for v in values
        ):
            return (values[0], values[1]), keyword
    return None, None


# --------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------
def _header_int(ds, keyword: str, default: int | None = None) -> int | None:  # noqa: ANN001
    value = ds.get(keyword, default)
    if value is None or value == "":
        return default
    return int(value)


def decode_dicom(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode the bytes of a DICOM Part 10 file; see the module docstring for the pipeline."""
    if data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] != DICOM_MAGIC:
        raise RejectedInput("not a DICOM Part 10 file: no DICM marker at byte 128")
    with quiet_pydicom():
        return _decode_dicom(data, max_pixels)


def _decode_dicom(data: bytes, max_pixels: int) -> DecodedImage:
    import pydicom
    from pydicom.pixels import get_decoder
    from pydicom.pixels import pixel_array as decode_pixels

    # 1. Header only.
    try:
        hdr = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception as e:  # noqa: BLE001 - anything pydicom raises means a bad header
        raise RejectedInput(f"corrupt or truncated DICOM header ({type(e).__name__})") from None

    try:
        meta_info = hdr.file_meta
        sop = hdr.get("SOPClassUID") or meta_info.get("MediaStorageSOPClassUID")
        if not sop:
            raise RejectedInput("unsupported DICOM object: no SOP Class UID")
        sop = str(sop)
        if sop not in ALLOWED_SOP_CLASSES:
            raise RejectedInput(
                f"unsupported DICOM object: {describe_sop_class(sop)}; only CR, DX and "
                "Secondary Capture images are accepted"
            )
        ts = meta_info.get("TransferSyntaxUID")
        if ts is None or _safe_uid(ts) is None:
            raise RejectedInput("corrupt DICOM: missing or invalid Transfer Syntax UID")
        rows = _header_int(hdr, "Rows")
        cols = _header_int(hdr, "Columns")
        if not rows or not cols:
            raise RejectedInput("DICOM without an image: Rows/Columns missing or zero")
        if rows * cols > max_pixels:
            raise RejectedInput(
                f"image too large: declared {cols}x{rows} = {rows * cols} pixels exceeds the "
                f"limit of {max_pixels} pixels (decompression-bomb guard)"
            )
        n_frames = _header_int(hdr, "NumberOfFrames", 1) or 1
        bits_stored = _header_int(hdr, "BitsStored")
        bits_allocated = _header_int(hdr, "BitsAllocated")
        spp = _header_int(hdr, "SamplesPerPixel", 1) or 1
        photometric = str(hdr.get("PhotometricInterpretation", "") or "").strip().upper()
        modality = str(hdr.get("Modality", "") or "").strip().upper()
    except RejectedInput:
        raise
    except Exception as e:  # noqa: BLE001
        raise RejectedInput(f"corrupt DICOM header ({type(e).__name__})") from None

    if photometric not in GRAY_PHOTOMETRICS + COLOR_PHOTOMETRICS:
        raise RejectedInput("unsupported or missing Photometric Interpretation")
    if bits_stored is None or bits_allocated is None:
        raise RejectedInput("corrupt DICOM header: Bits Stored/Allocated missing")
    from pydicom.uid import UID

    ts = UID(str(ts))
    ts_name = ts.name if ts.is_transfer_syntax else "unknown transfer syntax"
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise RejectedInput(f"unsupported transfer syntax: {ts_name} ({ts})") from None
    if not decoder.is_available:
        raise RejectedInput(
            f"no decoder installed for {ts_name} ({ts}): install pylibjpeg, "
            "pylibjpeg-libjpeg and pylibjpeg-openjpeg"
        )

    # 2. Whole dataset, frame 0.
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001
        raise RejectedInput(f"corrupt or truncated DICOM ({type(e).__name__})") from None
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise RejectedInput("unsupported DICOM: float pixel data")
        raise RejectedInput("DICOM without pixel data")
    if not ts.is_compressed:
        from pydicom.pixels.utils import get_expected_length

        try:
            expected = get_expected_length(ds)
        except Exception as e:  # noqa: BLE001
            raise RejectedInput(f"corrupt DICOM image header ({type(e).__name__})") from None
        actual = len(ds.PixelData)
        if actual < expected:
            raise RejectedInput(
                f"truncated DICOM: pixel data has {actual} of {expected} expected bytes"
            )
    try:
        stored = decode_pixels(ds, index=0)
    except Exception as e:  # noqa: BLE001
        what = "compressed" if ts.is_compressed else "native"
        raise RejectedInput(
            f"corrupt or truncated DICOM: {what} pixel data ({ts_name}) cannot be decoded "
            f"({type(e).__name__})"
        ) from None

    warn: list[str] = []
    if n_frames > 1:
        warn.append(f"multi-frame DICOM ({n_frames} frames): frame 0 used")
    info: dict[str, object] = {"modality_lut": "none", "voi": "none", "inverted": False}
    try:
        if photometric in GRAY_PHOTOMETRICS:
            if stored.ndim != 2:
                raise RejectedInput(f"unexpected grayscale array shape {tuple(stored.shape)}")
            params, param_warn = grayscale_params(ds)
            warn.extend(param_warn)
            values, info = grayscale_pipeline(stored, params)
            warn.extend(info.pop("warnings"))  # type: ignore[arg-type]
        else:
            if photometric == "PALETTE COLOR":
                from pydicom.pixels import apply_color_lut

                stored = apply_color_lut(stored, ds)
            if stored.ndim != 3:
                raise RejectedInput(f"unexpected colour array shape {tuple(stored.shape)}")
            values = rgb_to_gray(stored)
            warn.append("colour converted to gray (BT.601 luma)")
    except RejectedInput:
        raise
    except Exception as e:  # noqa: BLE001
        raise RejectedInput(
            f"cannot apply the DICOM display pipeline ({type(e).__name__})"
        ) from None

    spacing, spacing_source = pixel_spacing(ds)
    if spacing is None:
        warn.append("pixel spacing unknown (missing, zero or implausible in header)")
        single = None
    elif abs(spacing[0] - spacing[1]) <= 1e-3 * max(spacing):
        single = spacing[0]
    else:
        single = None
        warn.append("anisotropic pixel spacing: see pixel_spacing_rc")

    meta = {
        "source_format": "dicom",
        "width": int(cols),
        "height": int(rows),
        "photometric": photometric,
        "pixel_spacing": single,
        "pixel_spacing_rc": list(spacing) if spacing else None,
        "pixel_spacing_source": spacing_source,
        "bits_stored": int(bits_stored),
        "bits_allocated": int(bits_allocated),
        "samples_per_pixel": int(spp),
        "n_frames": int(n_frames),
        "transfer_syntax": str(ts),
        "transfer_syntax_name": ts_name,
        "sop_class": ALLOWED_SOP_CLASSES[sop],
        "modality": modality if modality in KNOWN_MODALITIES else None,
        "modality_lut": info.get("modality_lut"),
        "voi": info.get("voi"),
        "inverted": bool(info.get("inverted", False)),
        "warnings": warn,
    }
    pixels = np.ascontiguousarray(values, dtype=np.float32)
    if pixels.shape != (rows, cols):
        raise RejectedInput(
            f"decoded size {pixels.shape[1]}x{pixels.shape[0]} disagrees with header {cols}x{rows}"
        )
    return DecodedImage(pixels=pixels, meta=meta)
