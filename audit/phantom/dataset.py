"""Phantom datasets on disk: 8-bit PNGs, DX DICOMs and NIH-format box and label CSVs.

The images come from :func:`audit.phantom.generate.generate_phantom`; the same arguments give
byte-identical files.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from audit.phantom.generate import FINDINGS, FRAME, PhantomConfig, generate_phantom

# Header lines copied from the NIH files (BBox_List_2017 dev release and Data_Entry_2017).
BBOX_CSV_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],"
DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
CSV_NEWLINE = "\r\n"  # the NIH files use CRLF
PIXEL_SPACING_MM = 0.143

DX_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image - For Presentation


def phantom_name(index: int, ext: str = "png") -> str:
    """File name of phantom ``index`` (0-based): ``phantom_00001_000.png`` for index 0."""
    return f"phantom_{index + 1:05d}_000.{ext}"


@dataclass(frozen=True)
class PhantomDataset:
    """Paths written by :func:`write_phantom_dataset`."""

    root: Path
    images_dir: Path
    pngs: list[Path]
    dicoms: list[Path]
    bbox_csv: Path
    labels_csv: Path


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def _fmt(v: float) -> str:
    return repr(float(v))


def dicom_bytes(
    image: np.ndarray, seed: int, index: int, photometric: str = "MONOCHROME2"
) -> bytes:
    """An uncompressed DX DICOM of ``image`` (uint8), 12 bits stored, deterministic UIDs.

    MONOCHROME1 stores inverted values (4095 - v), so both decode to the same image once the
    photometric interpretation is honoured. No PHI: the patient is "PHANTOM"."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(photometric)
    v = np.rint(image.astype(np.float64) * (4095.0 / 255.0)).astype(np.uint16)
    if photometric == "MONOCHROME1":
        v = (4095 - v).astype(np.uint16)

    def uid(kind: str) -> str:
        return generate_uid(entropy_srcs=["cxr-audit-phantom", str(seed), str(index), kind])

    sop_uid = uid("sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_SOP_CLASS_UID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "2.25.1"
    meta.ImplementationVersionName = "CXRAUDIT_PH"

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_SOP_CLASS_UID
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.FrameOfReferenceUID = uid("frame")
    ds.Modality = "DX"
    ds.PatientName = "PHANTOM"
    ds.PatientID = f"phantom_{index + 1:05d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.Manufacturer = "cxr-audit digital phantom"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = ["R", "F"]
    ds.ImagerPixelSpacing = [PIXEL_SPACING_MM, PIXEL_SPACING_MM]
    ds.PixelSpacing = [PIXEL_SPACING_MM, PIXEL_SPACING_MM]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(image.shape[0]), int(image.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelData = v.astype("<u2").tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def write_phantom_dataset(
    out_dir: str | Path,
    n_images: int,
    seed: int,
    shortcut: bool = False,
    n_dicom: int = 4,
    config: PhantomConfig | None = None,
) -> PhantomDataset:
    """Write ``n_images`` phantoms as 8-bit PNGs in ``out_dir/images`` plus NIH-format CSVs.

    - ``out_dir/images/phantom_00001_000.png`` ... (index 0 -> ``00001``).
    - ``out_dir/dicom/phantom_0000K_000.dcm``: the first ``n_dicom`` images again as uncompressed
      DX DICOMs, alternating MONOCHROME2 / MONOCHROME1 (same stem as their PNG twin).
    - ``out_dir/BBox_List_phantom.csv``: NIH ``BBox_List_2017`` layout (header
      ``Image Index,Finding Label,Bbox [x,y,w,h],``, rows ``name,finding,x,y,w,h,``, CRLF).
    - ``out_dir/Data_Entry_phantom.csv``: NIH ``Data_Entry_2017`` layout (``No Finding`` when
      nothing is planted; the marker is not a finding and is not listed).
    Same arguments -> byte-identical files.
    """
    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    cfg = replace(config or PhantomConfig(), size=FRAME, shortcut=shortcut)
    pngs, dicoms = [], []
    bbox_rows, entry_rows = [], []
    for i in range(n_images):
        image, boxes, labels = generate_phantom(seed, i, cfg)
        name = phantom_name(i)
        path = images_dir / name
        path.write_bytes(_png_bytes(image))
        pngs.append(path)
        for finding, (x, y, w, h) in boxes:
            bbox_rows.append(f"{name},{finding},{_fmt(x)},{_fmt(y)},{_fmt(w)},{_fmt(h)},")
        found = [f for f in FINDINGS if labels[f]]
        meta_rng = np.random.default_rng(np.random.SeedSequence([int(seed), i, 0xA6E]))
        age = int(meta_rng.integers(25, 85))
        sex = "M" if meta_rng.uniform() < 0.5 else "F"
        entry_rows.append(
            f"{name},{'|'.join(found) if found else 'No Finding'},0,{i + 1},{age},{sex},PA,"
            f"{FRAME},{FRAME},{PIXEL_SPACING_MM},{PIXEL_SPACING_MM}"
        )
        if i < n_dicom:
            dicom_dir = out / "dicom"
            dicom_dir.mkdir(exist_ok=True)
            photometric = "MONOCHROME2" if i % 2 == 0 else "MONOCHROME1"
            dpath = dicom_dir / phantom_name(i, "dcm")
            dpath.write_bytes(dicom_bytes(image, seed, i, photometric))
            dicoms.append(dpath)
    bbox_csv = out / "BBox_List_phantom.csv"
    bbox_csv.write_bytes(CSV_NEWLINE.join([BBOX_CSV_HEADER, *bbox_rows, ""]).encode("ascii"))
    labels_csv = out / "Data_Entry_phantom.csv"
    labels_csv.write_bytes(CSV_NEWLINE.join([DATA_ENTRY_HEADER, *entry_rows, ""]).encode("ascii"))
    return PhantomDataset(out, images_dir, pngs, dicoms, bbox_csv, labels_csv)


def read_csv_header(path: str | Path) -> list[str]:
    """First row of a CSV file as parsed by the csv module (used to compare layouts)."""
    with open(path, newline="") as fh:
        return next(csv.reader(fh))
