"""Compute the ``average_box`` baseline table from the DEVELOPMENT half of the NIH boxes.

    python scripts/make_average_boxes.py \
        [--bbox-csv ../shared/data/nih_bbox_dev/BBox_List_2017_dev.csv] \
        [--out audit/saliency/average_boxes_nih.json]

For each finding: the mean of x, y, w, h over its boxes (1024x1024 frame, continuous pixel
coordinates), the number of boxes, and their standard deviations. Provenance: the source file
name and sha256. Only the development half may be used (the evaluation half is held out): the
script refuses a file that lists more boxes than the development half (491).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CSV = REPO.parent / "shared" / "data" / "nih_bbox_dev" / "BBox_List_2017_dev.csv"
DEFAULT_OUT = REPO / "audit" / "saliency" / "average_boxes_nih.json"
NIH_TO_MODEL = {"Infiltrate": "Infiltration"}
DEV_HALF_MAX_BOXES = 491


def read_boxes(path: Path) -> list[tuple[str, str, float, float, float, float]]:
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        if not header or header[0].strip() != "Image Index":
            raise ValueError(f"{path}: not an NIH BBox_List file (header {header[:3]})")
        for row in reader:
            if not row or not row[0].strip():
                continue
            image, finding = row[0].strip(), row[1].strip()
            x, y, w, h = (float(v) for v in row[2:6])
            rows.append((image, finding, x, y, w, h))
    return rows


def average_boxes(rows) -> dict[str, dict[str, float]]:
    groups: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    for _image, finding, x, y, w, h in rows:
        groups[finding].append((x, y, w, h))
    out = {}
    for finding in sorted(groups):
        boxes = groups[finding]
        n = len(boxes)
        means = [math.fsum(b[i] for b in boxes) / n for i in range(4)]
        sds = [math.sqrt(math.fsum((b[i] - means[i]) ** 2 for b in boxes) / max(n - 1, 1))
               for i in range(4)]
        model_name = NIH_TO_MODEL.get(finding, finding)
        out[model_name] = {
            "nih_name": finding,
            "n": n,
            "x": means[0], "y": means[1], "w": means[2], "h": means[3],
            "sd_x": sds[0], "sd_y": sds[1], "sd_w": sds[2], "sd_h": sds[3],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--bbox-csv", type=Path, default=DEFAULT_CSV)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    rows = read_boxes(args.bbox_csv)
    if len(rows) > DEV_HALF_MAX_BOXES:
        raise SystemExit(f"{args.bbox_csv} lists {len(rows)} boxes: more than the development "
                         f"half ({DEV_HALF_MAX_BOXES}); the evaluation half must not be used")
    digest = hashlib.sha256(args.bbox_csv.read_bytes()).hexdigest()
    table = {
        "description": "Average NIH expert box per finding (mean of x, y, w, h), development "
                       "half only; baseline 'average_box' of audit.saliency.",
        "frame": {"width": 1024, "height": 1024},
        "coordinates": "continuous pixel coordinates (x, y, w, h) of the 1024x1024 NIH frame",
        "source": {
            "file": args.bbox_csv.name,
            "sha256": digest,
            "split": "development half (patient-level split; evaluation half held out)",
            "n_boxes": len(rows),
            "n_images": len({r[0] for r in rows}),
        },
        "generated_by": "scripts/make_average_boxes.py",
        "boxes": average_boxes(rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(table['boxes'])} findings from {len(rows)} boxes "
          f"({args.bbox_csv.name}, sha256 {digest[:12]}...)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
