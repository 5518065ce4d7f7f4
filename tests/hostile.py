"""Builders of small hostile and unusual inputs for reader and ingest tests.

Everything is written into a folder the caller owns (``tmp_path``); nothing here touches
../shared. Files are deterministic (fixed seeds and fixed UIDs), so two builds are byte-identical.

- PNG: gray 8-bit, 16-bit, RGB, RGBA, LA, palette, all-zero, truncated, a decompression bomb
  (a ~100-byte file whose header declares 20000 x 20000 pixels), a JPEG named ``.png``.
- DICOM: CR / multi-frame SC / MONOCHROME1 12-bit with rescale and window, truncated, no pixel
  data, Basic Text SR, a header declaring 20000 x 20000, a text file named ``.dcm``, and
  `write_phi_dicom` whose every identifying string is `SENTINEL`.
- `build_hostile_folder`: all of the above plus an NIH-format box CSV with a zero-size box, a box
  outside its image and a row for a file that is not on disk; returns what ingest must do.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

SENTINEL = "SENTINEL^PHI"
SENTINEL_BYTES = b"SENTINEL"

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SC_MULTIFRAME_BYTE = "1.2.840.10008.5.1.4.1.1.7.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
_UID_ROOT = "1.2.826.0.1.3680043.10.1234."  # fixed test UIDs: deterministic files

# Hand-computable 12-bit MONOCHROME1 case (see tests/test_readers.py for the arithmetic).
MONO1_STORED = np.array([0, 600, 1000, 1200, 2000, 4095], dtype=np.uint16)
MONO1_SLOPE, MONO1_INTERCEPT = 2.0, -1024.0
MONO1_WINDOWS = ((1000.0, 2001.0), (500.0, 100.0))  # the first must be used
MONO1_EXPECTED = np.array([1.0, 0.91175, 0.51175, 0.31175, 0.0, 0.0])


def gradient(height: int = 64, width: int = 48, maxval: int = 255, seed: int = 0) -> np.ndarray:
    """A non-constant test image: a diagonal ramp plus a little deterministic noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = (xx / max(width - 1, 1) + yy / max(height - 1, 1)) / 2
    noise = rng.integers(0, max(maxval // 16, 2), size=(height, width))
    return np.clip(np.rint(ramp * maxval) + noise, 0, maxval).astype(np.int64)


# ------------------------------------------------------------------------------------------
# PNG
# ------------------------------------------------------------------------------------------
def write_png(path: Path, image: Image.Image) -> Path:
    image.save(path, format="PNG")
    return path


def png_gray8(path: Path, pixels: np.ndarray | None = None) -> Path:
    g = gradient() if pixels is None else pixels
    return write_png(path, Image.fromarray(g.astype(np.uint8), mode="L"))


def png_gray16(path: Path) -> Path:
    g = gradient(maxval=60000)
    im = Image.frombytes("I;16", (g.shape[1], g.shape[0]), g.astype("<u2").tobytes())
    return write_png(path, im)


def png_rgba(path: Path, gray: np.ndarray | None = None) -> Path:
    """R = G = B = gray, a varying alpha that must be ignored."""
    g = (gradient() if gray is None else gray).astype(np.uint8)
    alpha = gradient(seed=1)[::-1].astype(np.uint8)
    return write_png(path, Image.fromarray(np.stack([g, g, g, alpha], axis=-1), mode="RGBA"))


def png_rgb(path: Path) -> Path:
    r, g, b = gradient(seed=2), gradient(seed=3)[::-1], gradient(seed=4)[:, ::-1]
    return write_png(path, Image.fromarray(np.stack([r, g, b], -1).astype(np.uint8), mode="RGB"))


def png_la(path: Path) -> Path:
    g = gradient().astype(np.uint8)
    alpha = np.full_like(g, 7)
    return write_png(path, Image.fromarray(np.stack([g, alpha], axis=-1), mode="LA"))


def png_palette(path: Path) -> Path:
    """Palette index i shows gray 255 - i: the reader must go through the palette."""
    idx = gradient().astype(np.uint8)
    im = Image.frombytes("P", (idx.shape[1], idx.shape[0]), idx.tobytes())
    im.putpalette([v for i in range(256) for v in (255 - i,) * 3])
    return write_png(path, im)


def png_constant(path: Path, value: int = 0) -> Path:
    return png_gray8(path, np.full((32, 32), value))


def png_truncated(path: Path) -> Path:
    """A noisy PNG cut inside its image data."""
    rng = np.random.default_rng(5)
    noisy = rng.integers(0, 256, size=(128, 128)).astype(np.uint8)
    tmp = path.with_suffix(".full.tmp")
    png_gray8(tmp, noisy)
    data = tmp.read_bytes()
    tmp.unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def png_bomb(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A valid-looking PNG header declaring ``width x height`` 8-bit gray, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    data = (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )
    path.write_bytes(data)
    return path


def jpeg_named_png(path: Path) -> Path:
    Image.fromarray(gradient().astype(np.uint8), mode="L").save(path, format="JPEG")
    return path


# ------------------------------------------------------------------------------------------
# DICOM
# ------------------------------------------------------------------------------------------
def _dataset(sop_class: str, instance: int):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    uid = f"{_UID_ROOT}{instance}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = f"{_UID_ROOT}0"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = f"{uid}.1"
    ds.SeriesInstanceUID = f"{uid}.2"
    ds.Modality = "CR"
    return ds


def _set_pixels(
    ds,  # noqa: ANN001
    frames: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 8,
) -> None:
    """``frames``: (H, W) or (F, H, W) unsigned values."""
    arr = np.asarray(frames)
    allocated = 8 if bits_stored <= 8 else 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(arr.shape[-2]), int(arr.shape[-1])
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if arr.ndim == 3:
        ds.NumberOfFrames = int(arr.shape[0])
    ds.PixelData = arr.astype(f"<u{allocated // 8}").tobytes()


def _save(ds, path: Path) -> Path:  # noqa: ANN001
    ds.save_as(path, enforce_file_format=True)
    return path


def dicom_cr(
    path: Path,
    pixels: np.ndarray | None = None,
    instance: int = 1,
    sop_class: str = CR_STORAGE,
    bits_stored: int = 8,
    photometric: str = "MONOCHROME2",
    **tags,
) -> Path:
    """A small uncompressed CR MONOCHROME2 image (8-bit `gradient()` by default).

    ``sop_class`` replaces CR Image Storage (header and file meta); ``tags`` are set on the
    dataset last, so they can override anything.
    """
    ds = _dataset(sop_class, instance)
    _set_pixels(ds, gradient() if pixels is None else pixels, photometric, bits_stored)
    for k, v in tags.items():
        setattr(ds, k, v)
    return _save(ds, path)


def dicom_multiframe(path: Path) -> Path:
    """Three-frame Multi-frame Grayscale Byte SC; frame 0 is `gradient()`, others differ."""
    ds = _dataset(SC_MULTIFRAME_BYTE, 2)
    ds.Modality = "OT"
    g = gradient()
    _set_pixels(ds, np.stack([g, 255 - g, g // 2]))
    return _save(ds, path)


def dicom_mono1_12bit(path: Path) -> Path:
    """MONOCHROME1, 12 of 16 bits, rescale 2/-1024, two windows; row 0 holds `MONO1_STORED`."""
    ds = _dataset(DX_PRESENTATION, 3)
    ds.Modality = "DX"
    stored = np.tile(MONO1_STORED, (4, 1))
    _set_pixels(ds, stored, photometric="MONOCHROME1", bits_stored=12)
    ds.RescaleSlope = MONO1_SLOPE
    ds.RescaleIntercept = MONO1_INTERCEPT
    ds.RescaleType = "US"
    ds.WindowCenter = [c for c, _ in MONO1_WINDOWS]
    ds.WindowWidth = [w for _, w in MONO1_WINDOWS]
    ds.PixelSpacing = [0.2, 0.2]
    return _save(ds, path)


def dicom_truncated(path: Path) -> Path:
    full = dicom_cr(path.with_suffix(".full.tmp"), instance=4)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) - 1000])
    return path


def dicom_no_pixels(path: Path) -> Path:
    """A CR header with image attributes but no Pixel Data element."""
    ds = _dataset(CR_STORAGE, 5)
    _set_pixels(ds, gradient())
    del ds.PixelData
    return _save(ds, path)


def dicom_sr(path: Path, phi: bool = False) -> Path:
    """A Basic Text SR document (no pixels); with ``phi`` its identifying strings are SENTINEL."""
    ds = _dataset(BASIC_TEXT_SR, 6)
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    if phi:
        _fill_phi(ds)
    return _save(ds, path)


def dicom_huge_header(path: Path) -> Path:
    """A CR whose header declares 20000 x 20000 but carries a few bytes: refuse before decode."""
    ds = _dataset(CR_STORAGE, 7)
    _set_pixels(ds, gradient())
    ds.Rows = ds.Columns = 20000
    return _save(ds, path)


def text_named_dcm(path: Path) -> Path:
    path.write_text("this is not a DICOM file, just text with a .dcm name\n" * 10)
    return path


PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientAddress",
    "PatientMotherBirthName",
    "PatientComments",
    "AdditionalPatientHistory",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "RequestingPhysician",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "AccessionNumber",
    "StudyID",
    "StationName",
    "DeviceSerialNumber",
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "ImageComments",
    "DerivationDescription",
    "WindowCenterWidthExplanation",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
)


def _fill_phi(ds) -> None:  # noqa: ANN001
    from pydicom.dataset import Dataset

    for keyword in PHI_KEYWORDS:
        setattr(ds, keyword, SENTINEL)
    for keyword in ("BodyPartExamined", "ViewPosition", "PatientSex"):  # code strings too
        setattr(ds, keyword, "SENTINEL")
    item = Dataset()
    item.CodeMeaning = SENTINEL
    ds.ProcedureCodeSequence = [item]
    block = ds.private_block(0x0009, "SENTINEL CREATOR", create=True)
    block.add_new(0x01, "LO", SENTINEL)


def write_phi_dicom(path: Path, sop_class: str = CR_STORAGE) -> Path:
    """A valid uncompressed CR (or another SOP class) whose every identifying string is SENTINEL.

    Person names, IDs, institution, descriptions, comments, a code sequence and a private tag
    carry `SENTINEL`; the image itself is `gradient()`. Use ``sop_class=BASIC_TEXT_SR`` for a
    document that must be rejected, also without leaking the sentinel.
    """
    ds = _dataset(sop_class, 8)
    if sop_class != BASIC_TEXT_SR:
        _set_pixels(ds, gradient())
        ds.WindowCenter, ds.WindowWidth = 128, 256
    _fill_phi(ds)
    return _save(ds, path)


# ------------------------------------------------------------------------------------------
# A whole hostile folder for ingest
# ------------------------------------------------------------------------------------------
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"


@dataclass
class HostileSet:
    images_dir: Path
    bbox_csv: Path
    accepted: set[str] = field(default_factory=set)
    """Image keys that must be in the manifest."""
    rejected_files: dict[str, str] = field(default_factory=dict)
    """Image key -> the start of its reject reason."""
    rejected_boxes: dict[tuple[str, str], str] = field(default_factory=dict)
    """(image key, finding) -> the start of its reject reason."""
    good_boxes: dict[tuple[str, str], tuple[float, float, float, float]] = field(
        default_factory=dict
    )
    skipped: set[str] = field(default_factory=set)
    """Files that are neither images nor rejects (no image extension, not PNG/DICOM)."""


def build_hostile_folder(root: Path) -> HostileSet:
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    hs = HostileSet(images_dir=images, bbox_csv=root / "boxes.csv")

    good = {
        "gray8.png": png_gray8,
        "gray16.png": png_gray16,
        "rgb.png": png_rgb,
        "rgba.png": png_rgba,
        "la.png": png_la,
        "palette.png": png_palette,
        "multiframe.dcm": dicom_multiframe,
        "mono1_12bit.dcm": dicom_mono1_12bit,
        "cr.dcm": dicom_cr,
    }
    for name, build in good.items():
        build(images / name)
    dicom_cr(images / "sub" / "1.2.826.0.1.3680043.10.1234.99", instance=99)  # UID-named, no .dcm
    hs.accepted = set(good) | {"1.2.826.0.1.3680043.10.1234.99"}

    bad = {
        "truncated.png": (png_truncated, "truncated PNG"),
        "bomb.png": (png_bomb, "image too large"),
        "zeros.png": (png_constant, "empty decode"),
        "jpeg.png": (jpeg_named_png, "not a PNG or DICOM file"),
        "truncated.dcm": (dicom_truncated, "truncated DICOM"),
        "text.dcm": (text_named_dcm, "not a PNG or DICOM file"),
        "sr.dcm": (dicom_sr, "unsupported DICOM object"),
        "nopixels.dcm": (dicom_no_pixels, "DICOM without pixel data"),
        "huge_header.dcm": (dicom_huge_header, "image too large"),
    }
    for name, (build, reason) in bad.items():
        build(images / "sub" / name if name == "sr.dcm" else images / name)
        hs.rejected_files[name] = reason
    (images / "README").write_text("notes, not an image\n")
    (images / "boxes_copy.csv").write_text(BBOX_HEADER)
    hs.skipped = {"README", "boxes_copy.csv"}

    rows = [
        ("rgba.png", "Nodule", (10.0, 12.0, 20.0, 30.0), None),
        ("gray8.png", "Mass", (0.0, 0.0, 48.0, 64.0), None),  # exactly the full image
        ("gray8.png", "Effusion", (-0.5, 3.0, 48.9, 60.0), None),  # within 1 px tolerance
        ("gray16.png", "Atelectasis", (5.0, 5.0, 0.0, 10.0), "non-positive box size"),
        ("la.png", "Mass", (5.0, 5.0, 10.0, -3.0), "non-positive box size"),
        ("palette.png", "Effusion", (30.0, 10.0, 40.0, 10.0), "box outside image"),
        ("cr.dcm", "Pneumothorax", (-20.0, 1.0, 10.0, 10.0), "box outside image"),
        ("rgb.png", "", (1.0, 1.0, 10.0, 10.0), "malformed box row in CSV: empty finding"),
        ("missing.png", "Cardiomegaly", (1.0, 1.0, 10.0, 10.0), "listed in box CSV but missing"),
        ("truncated.png", "Mass", (1.0, 1.0, 10.0, 10.0), "dropped"),  # its image is rejected
    ]
    lines = [BBOX_HEADER]
    for key, finding, (x, y, w, h), reason in rows:
        lines.append(f"{key},{finding},{x!r},{y!r},{w!r},{h!r}\n")
        if reason is None:
            hs.good_boxes[(key, finding)] = (x, y, w, h)
        elif reason != "dropped":
            hs.rejected_boxes[(key, finding)] = reason
    hs.bbox_csv.write_text("".join(lines))
    return hs
