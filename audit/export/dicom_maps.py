"""A run's saved saliency maps as DICOM Parametric Maps (`cxr-audit export-dicom`).

For every saved map (``maps/<method>.npz``, `--save-maps`) of an image whose source is a DICOM,
one Parametric Map (built by highdicom) that a viewer overlays on the source:

- Geometry: the source's pixel matrix. The model saw the whole image resized (never cropped,
  `audit.data.preprocess`), so the map's pixel (i, j) covers the source pixels whose centres
  fall in it: each map pixel is repeated over its block (nearest neighbour, no interpolation),
  and the map's values are the exported values. Sampled at the centre of each map pixel's
  block, the export gives the saved map back exactly.
- Values: 32-bit float (Float Pixel Data), the run's map as saved (raw, signed saliency in
  float16, which float32 holds exactly), with an identity real-world value mapping and a
  window over the map's range.
- References: the source's Study Instance UID (the map joins the source's study), its SOP
  instance in the derivation and source image sequences, its series in the referenced series.
- Identifiers: by default none are copied. highdicom copies the Patient and Study modules of the
  source it is given, so it is given a header that holds only the source's UIDs and geometry;
  patient name and ID, birth date, sex, study date and time, accession number, study ID and the
  referring physician are written empty (``PatientIdentityRemoved`` YES), as the rest of the
  run holds no patient identifier. ``keep_identifiers`` gives highdicom the whole source header.

The source file must be the one the run audited (its sha256 is checked against the manifest);
images that are not DICOM, not reachable or changed are skipped with the reason.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from audit import __version__
from audit.store.files import sha256_file
from audit.store.rundir import SavedMaps, read_run_json, thumbnail_name

#: Source attributes the map needs without identifiers: what it references and where it lies.
GEOMETRY_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
    "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "PixelSpacing", "ImagerPixelSpacing",
    "PatientOrientation", "ImageOrientationPatient", "ImagePositionPatient",
    "FrameOfReferenceUID", "SliceThickness", "NumberOfFrames", "SeriesNumber",
)
#: Type 2 attributes of the Patient and General Study modules, written empty by default.
EMPTIED_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "AccessionNumber", "StudyID", "ReferringPhysicianName",
)
#: De-identification Method (LO, at most 64 characters).
DEIDENTIFICATION_METHOD = "cxr-audit: no patient or study identifier; source UIDs kept"
MAP_SUFFIX = ".dcm"


class ExportError(RuntimeError):
    """The run cannot be exported (no saved maps, no manifest)."""


@dataclass(frozen=True)
class ExportedMap:
    image_key: str
    finding: str
    method: str
    path: Path
    sop_instance_uid: str


@dataclass
class ExportResult:
    written: list[ExportedMap] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image_key, reason)


def to_source_frame(saliency: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """The map on the source's pixel matrix: source pixel (r, c) takes the map pixel its centre
    falls in, ``floor((r + 0.5) * h / rows)`` (same for columns); float32."""
    h, w = saliency.shape
    r = np.minimum(((np.arange(rows) + 0.5) * h / rows).astype(np.int64), h - 1)
    c = np.minimum(((np.arange(columns) + 0.5) * w / columns).astype(np.int64), w - 1)
    return np.asarray(saliency, dtype=np.float32)[np.ix_(r, c)]


def block_centres(size: int, source: int) -> np.ndarray:
    """Source pixel index at the centre of each map pixel's block (the inverse sampling)."""
    return np.minimum(((np.arange(size) + 0.5) * source / size).astype(np.int64), source - 1)


def source_header(path: Path, keep_identifiers: bool) -> Any:
    """The source's header as highdicom should see it: whole with ``keep_identifiers``, else
    only `GEOMETRY_KEYWORDS` with the identifiers empty."""
    import pydicom
    from pydicom.dataset import Dataset

    full = pydicom.dcmread(path, stop_before_pixels=True)
    header = copy.deepcopy(full) if keep_identifiers else Dataset()
    if not keep_identifiers:
        for keyword in GEOMETRY_KEYWORDS:
            if keyword in full:
                setattr(header, keyword, full.data_element(keyword).value)
        for keyword in EMPTIED_KEYWORDS:
            setattr(header, keyword, "")
    return header


def _projection_map_class() -> type:
    """highdicom's ParametricMap, with one fix for sources without a patient coordinate system
    (a projection radiograph: no Image Orientation/Position (Patient)). highdicom 0.28 indexes
    such a map's single frame by Frame Label in the Dimension Index Sequence but gives the frame
    no index value, then refuses its own dataset ("Unexpected mismatch between dimension index
    values ..."). The fix gives the frame what highdicom gives other frames without
    coordinates (index value 1, label "Frame") before highdicom's own check runs."""
    import highdicom as hd

    class ProjectionParametricMap(hd.pm.ParametricMap):
        def _build_luts(self) -> None:
            pointers = list(self.get("DimensionIndexSequence", []))
            for item in self.get("PerFrameFunctionalGroupsSequence", []):
                content = item.FrameContentSequence[0]
                if len(pointers) == 1 and not content.get("DimensionIndexValues"):
                    content.DimensionIndexValues = [1]
                    content.FrameLabel = "Frame"
            super()._build_luts()

    return ProjectionParametricMap


def parametric_map(header: Any, values: np.ndarray, *, run_id: str, method: str,
                   finding: str, uid: str, series_uid: str, instance_number: int) -> Any:
    """One highdicom Parametric Map of ``values`` (float32, the source's pixel matrix)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    lo, hi = float(values.min()), float(values.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=method[:16], lut_explanation=f"{method} saliency for {finding}"[:64],
        unit=codes.UCUM.NoUnits, value_range=(lo, hi), intercept=0, slope=1)
    pmap = _projection_map_class()(
        [header], values, series_instance_uid=series_uid, series_number=900,
        sop_instance_uid=uid, instance_number=instance_number, manufacturer="cxr-audit",
        manufacturer_model_name="cxr-audit", software_versions=__version__,
        device_serial_number=run_id[:64], contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(
            window_center=(lo + hi) / 2, window_width=max(hi - lo, 1e-6))],
        content_label="SALIENCY",
        content_description=f"{method} {finding} {run_id}"[:64])
    pmap.SeriesDescription = f"cxr-audit {method} {run_id}"[:64]
    return pmap


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["cxr-audit export-dicom", *parts])


def _sources(run: dict[str, Any], images_dir: Path | None) -> tuple[Any, Path]:
    from audit.data.manifest import read_manifest

    dataset = run.get("dataset") or {}
    manifest = Path(str(dataset.get("manifest_path", "")))
    if not manifest.is_file():
        raise ExportError(f"the run's manifest {manifest} is not reachable")
    rows = read_manifest(manifest).drop_duplicates("image_key").set_index("image_key")
    return rows, Path(images_dir or dataset.get("images_dir") or "")


def export_run(run_dir: Path, out_dir: Path, keep_identifiers: bool = False,
               images_dir: Path | None = None) -> ExportResult:
    """Write one Parametric Map per saved (image, finding, method) of a DICOM source into
    ``out_dir`` (module docstring); the others are skipped with their reason."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run = read_run_json(run_dir)
    maps = SavedMaps(run_dir / "maps")
    methods = sorted(p.stem for p in (run_dir / "maps").glob("*.npz"))
    if not methods:
        raise ExportError(f"{run_dir} saved no maps (run it with --save-maps)")
    rows, root = _sources(run, images_dir)
    result = ExportResult()
    instance: dict[str, int] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for method in methods:
        for image_key, finding, saliency in maps.all(method):
            reason = _unusable(rows, root, image_key)
            if reason:
                result.skipped.append((image_key, reason))
                continue
            header = source_header(root / str(rows.loc[image_key, "path"]), keep_identifiers)
            series_uid = _uid(run["run_id"], str(header.StudyInstanceUID), method)
            instance[series_uid] = instance.get(series_uid, 0) + 1
            uid = _uid(run["run_id"], image_key, finding, method)
            values = to_source_frame(saliency, int(header.Rows), int(header.Columns))
            pmap = parametric_map(header, values, run_id=run["run_id"], method=method,
                                  finding=finding, uid=uid, series_uid=series_uid,
                                  instance_number=instance[series_uid])
            if not keep_identifiers:
                pmap.PatientIdentityRemoved = "YES"
                pmap.DeidentificationMethod = DEIDENTIFICATION_METHOD
            path = out_dir / f"{Path(thumbnail_name(image_key)).stem}__{finding}__{method}" \
                             f"{MAP_SUFFIX}"
            pmap.save_as(path)
            result.written.append(ExportedMap(image_key, finding, method, path, uid))
    maps.close()
    return result


def _unusable(rows: Any, root: Path, image_key: str) -> str | None:
    """Why an image's source cannot be exported, or None."""
    if image_key not in rows.index:
        return "not in the run's manifest"
    row = rows.loc[image_key]
    if str(row["source_format"]) != "dicom":
        return f"not a DICOM ({row['source_format']})"
    path = root / str(row["path"])
    if not path.is_file():
        return f"source not reachable at {path}"
    if sha256_file(path) != row["sha256"]:
        return f"source changed since the run ({path})"
    return None
