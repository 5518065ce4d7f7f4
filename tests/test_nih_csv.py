"""NIH tables: the box list in both shipped layouts, the label table, finding names."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from audit.data.nih import (
    BBOX_COLUMNS,
    default_bbox_csv,
    default_labels_csv,
    read_bbox_csv,
    read_labels_csv,
    split_labels,
    to_model_finding,
)

DEV_COUNTS = {
    "Atelectasis": 85,
    "Cardiomegaly": 70,
    "Effusion": 81,
    "Infiltrate": 66,
    "Mass": 37,
    "Nodule": 44,
    "Pneumonia": 64,
    "Pneumothorax": 44,
}
ROWS = [
    ("00013118_008.png", "Atelectasis", "225.084745762712", "547.019216763771",
     "86.7796610169491", "79.1864406779661"),
    ("00014716_007.png", "Infiltrate", "686.101694915254", "131.543498411017",
     "185.491525423729", "313.491525423729"),
]  # fmt: skip


def test_to_model_finding_renames_infiltrate_only():
    assert to_model_finding("Infiltrate") == "Infiltration"
    for name in ("Atelectasis", "Effusion", "Nodule", "Infiltration", "Pneumothorax"):
        assert to_model_finding(name) == name


def test_default_bbox_csv_is_the_list_inside_torchxrayvision():
    path = default_bbox_csv()
    assert path.name == "BBox_List_2017.csv.gz" and path.parent.parent.name == "torchxrayvision"
    assert path.is_file() and default_labels_csv().is_file()


def test_full_torchxrayvision_list_parses_its_odd_header():
    with gzip.open(default_bbox_csv(), "rt") as f:
        assert f.readline().strip() == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    df = read_bbox_csv(default_bbox_csv())
    assert list(df.columns) == BBOX_COLUMNS and len(df) == 984
    assert df[["x", "y", "w", "h"]].notna().all().all()
    assert set(df["finding"]) == set(DEV_COUNTS)


def test_dev_list_parses_with_exact_values_and_counts(nih_dev_dir):
    df = read_bbox_csv(nih_dev_dir / "BBox_List_2017_dev.csv")
    assert len(df) == 491 and df["finding"].value_counts().to_dict() == DEV_COUNTS
    assert all(df[c].dtype == np.float64 for c in "xywh")
    first = df.iloc[0]
    assert (first.image_key, first.finding) == ("00013118_008.png", "Atelectasis")
    assert (first.x, first.y, first.w, first.h) == (
        225.084745762712, 547.019216763771, 86.7796610169491, 79.1864406779661
    )  # fmt: skip


def test_dev_list_is_a_subset_of_the_full_list(nih_dev_dir):
    dev = read_bbox_csv(nih_dev_dir / "BBox_List_2017_dev.csv")
    full = read_bbox_csv(default_bbox_csv())
    assert len(dev.merge(full, on=BBOX_COLUMNS, how="inner")) == len(dev)


@pytest.mark.parametrize(
    ("header", "row_tail", "newline"),
    [
        ("Image Index,Finding Label,Bbox [x,y,w,h],,,", "", "\n"),  # torchxrayvision .gz
        ("Image Index,Finding Label,Bbox [x,y,w,h],", ",", "\r\n"),  # shipped dev list
        ("Image Index,Finding Label,Bbox [x,y,w,h]", "", "\n"),  # no trailing columns at all
        ("Image Index,Finding Label,Bbox [x,y,w,h],,,", ",,,", "\n"),  # extra empty cells
    ],
)
def test_box_list_layouts_all_parse_to_the_same_table(tmp_path, header, row_tail, newline):
    text = newline.join([header] + [",".join(r) + row_tail for r in ROWS]) + newline
    path = tmp_path / "boxes.csv"
    path.write_bytes(text.encode())
    df = read_bbox_csv(path)
    expected = pd.DataFrame([(k, f, *map(float, v)) for k, f, *v in ROWS], columns=BBOX_COLUMNS)
    pd.testing.assert_frame_equal(df, expected, check_dtype=False)
    gz = tmp_path / "boxes.csv.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    pd.testing.assert_frame_equal(read_bbox_csv(gz), df)


def test_malformed_box_row_raises_or_becomes_nan(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\na.png,Mass,1,2,three,4\nb.png,Mass,1,2,3,4\n"
    )
    with pytest.raises(ValueError, match=":2: expected image, finding and 4 numbers"):
        read_bbox_csv(path)
    df = read_bbox_csv(path, on_bad_row="nan")
    assert df["x"].isna().tolist() == [True, False]
    bad = tmp_path / "other.csv"
    bad.write_text("name,label\n")
    with pytest.raises(ValueError, match="not an NIH box list"):
        read_bbox_csv(bad)


def test_label_table_parses_findings_and_split_columns(nih_dev_dir):
    df = read_labels_csv(nih_dev_dir / "Data_Entry_2017_dev.csv")
    assert len(df) == 438 and df["image_key"].is_unique
    row = df.set_index("image_key").loc["00000211_010.png"]
    assert row["labels"] == ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration"]
    assert (row["age"], row["sex"], row["view_position"]) == (58, "F", "PA")
    assert (row["original_width"], row["original_height"]) == (2992, 2991)
    assert row["original_spacing_x"] == pytest.approx(0.143)
    assert str(df["age"].dtype) == "Int64" and str(df["original_width"].dtype) == "Int64"


def test_label_table_handles_no_finding_and_old_age_format(tmp_path):
    path = tmp_path / "entries.csv"
    path.write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
        "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
        "a.png,No Finding,0,1,058Y,M,PA,2500,2048,0.168,0.168,\n"
        "b.png,Mass|Nodule,3,2,61,F,AP,2021,2021,0.194,0.194,\n"
    )
    df = read_labels_csv(path)
    assert df["labels"].tolist() == [["No Finding"], ["Mass", "Nodule"]]
    assert df["age"].tolist() == [58, 61]
    assert split_labels("") == [] and split_labels("A|B ") == ["A", "B"]


def test_unboxed_label_table(nih_unboxed_dir):
    df = read_labels_csv(nih_unboxed_dir / "Data_Entry_2017_unboxed.csv")
    assert len(df) == 22 and all(len(v) >= 1 for v in df["labels"])
