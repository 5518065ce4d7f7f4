"""NIH ChestX-ray14 tables: the expert box list and the label table.

``BBox_List_2017.csv`` has an odd header: ``Image Index,Finding Label,Bbox [x,y,w,h],,,`` -- the
four numbers of a box are spread over the header's split ``Bbox [x,y,w,h]`` name, and the file
has trailing empty columns. Copies differ in how many trailing commas the header and the rows
carry (the torchxrayvision ``.csv.gz`` has 6 header cells and 6 cells a row; the shipped dev list
has 4 header cells and 7 cells a row with CRLF line ends), so rows are parsed by position: image,
finding, then the first four non-empty cells as x, y, w, h.

``Data_Entry_2017*.csv`` similarly splits ``OriginalImage[Width,Height]`` and
``OriginalImagePixelSpacing[x,y]`` over two columns each.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from audit import protocol

BBOX_COLUMNS = ["image_key", "finding", "x", "y", "w", "h"]
LABEL_COLUMNS = [
    "image_key",
    "labels",
    "follow_up",
    "patient_id",
    "age",
    "sex",
    "view_position",
    "original_width",
    "original_height",
    "original_spacing_x",
    "original_spacing_y",
]
NO_FINDING = "No Finding"

def to_model_finding(nih_name: str) -> str:
    """The model output name for an NIH finding: ``Infiltrate`` -> ``Infiltration``; others pass
    (surrounding spaces removed)."""
    return protocol.to_model_finding(nih_name.strip())


def _torchxrayvision_data_dir() -> Path:
    spec = importlib.util.find_spec("torchxrayvision")  # locate without importing torch
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("torchxrayvision is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def default_bbox_csv() -> Path:
    """The full NIH box list (984 boxes) shipped inside torchxrayvision."""
    return _torchxrayvision_data_dir() / "BBox_List_2017.csv.gz"


def default_labels_csv() -> Path:
    """The full NIH label table shipped inside torchxrayvision (2020 revision)."""
    return _torchxrayvision_data_dir() / "Data_Entry_2017_v2020.csv.gz"


def _read_text(path: str | os.PathLike[str]) -> str:
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8-sig")


def read_bbox_csv(path: str | os.PathLike[str], on_bad_row: str = "raise") -> pd.DataFrame:
    """Parse an NIH box list into ``image_key, finding, x, y, w, h`` (float64), file order kept.

    A row without four numbers raises ``ValueError`` (``on_bad_row="raise"``), or is kept with
    NaN coordinates (``on_bad_row="nan"``) so that a caller can report it.
    """
    if on_bad_row not in ("raise", "nan"):
        raise ValueError("on_bad_row must be 'raise' or 'nan'")
    rows = list(csv.reader(io.StringIO(_read_text(path))))
    if not rows or not rows[0] or rows[0][0].strip() != "Image Index":
        raise ValueError(f"{path}: not an NIH box list (header must start with 'Image Index')")
    records = []
    for line_no, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        key = row[0].strip()
        finding = row[1].strip() if len(row) > 1 else ""
        cells = [c.strip() for c in row[2:] if c.strip()]
        coords: list[float] = []
        try:
            coords = [float(c) for c in cells[:4]]
        except ValueError:
            coords = []
        if len(cells) != 4 or len(coords) != 4 or not key:
            if on_bad_row == "raise":
                raise ValueError(f"{path}:{line_no}: expected image, finding and 4 numbers")
            coords = [math.nan] * 4
        records.append((key, finding, *coords))
    df = pd.DataFrame.from_records(records, columns=BBOX_COLUMNS)
    for c in ("x", "y", "w", "h"):
        df[c] = df[c].astype(np.float64)
    for c in ("image_key", "finding"):
        df[c] = df[c].astype(object)
    return df


_LABEL_HEADER = {
    "image index": "image_key",
    "finding labels": "labels",
    "follow-up #": "follow_up",
    "patient id": "patient_id",
    "patient age": "age",
    "patient gender": "sex",
    "view position": "view_position",
    "originalimage[width": "original_width",
    "height]": "original_height",
    "originalimagepixelspacing[x": "original_spacing_x",
    "y]": "original_spacing_y",
}


def split_labels(text: str) -> list[str]:
    """``"A|B"`` -> ``["A", "B"]``; an empty cell -> ``[]`` (``No Finding`` stays a label)."""
    return [t.strip() for t in str(text).split("|") if t.strip()]


def read_labels_csv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Parse an NIH ``Data_Entry_2017*.csv`` table.

    Columns: ``image_key, labels`` (list[str]), ``follow_up, patient_id, age`` (Int64),
    ``sex, view_position`` (str), ``original_width, original_height`` (Int64; the size of the
    image before NIH resized it to 1024 x 1024), ``original_spacing_x, original_spacing_y``
    (float64, mm, for the original size). Columns missing from a file are absent.
    """
    text = _read_text(path)
    raw = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, header=None)
    header = [str(h).strip().lower() for h in raw.iloc[0]]
    if not header or header[0] != "image index":
        raise ValueError(f"{path}: not an NIH label table (header must start with 'Image Index')")
    keep = {i: _LABEL_HEADER[h] for i, h in enumerate(header) if h in _LABEL_HEADER}
    df = raw.iloc[1:, list(keep)].rename(columns=keep).reset_index(drop=True)
    df["image_key"] = df["image_key"].str.strip().astype(object)
    if "labels" in df:
        df["labels"] = [split_labels(v) for v in df["labels"]]
    for c in ("follow_up", "patient_id", "age", "original_width", "original_height"):
        if c in df:
            # Older releases write ages as "058Y": keep the digits.
            digits = df[c].str.extract(r"(\d+)", expand=False)
            df[c] = pd.to_numeric(digits, errors="coerce").astype("Int64")
    for c in ("original_spacing_x", "original_spacing_y"):
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(np.float64)
    for c in ("sex", "view_position"):
        if c in df:
            df[c] = df[c].str.strip().astype(object)
    return df[[c for c in LABEL_COLUMNS if c in df]]
