"""Registry test data: per_pathology rows, box tables and finished run directories of an old
run A, a new run B (one regression, noise, a verdict change that is not a regression, an
improvement, pathologies present in one run only) and an improved run U, shared by
tests/test_registry.py and tests/test_compare.py."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from audit.store.registry import Registry

FP_A = "a" * 64  # model fingerprint of the audited model
FP_OTHER = "b" * 64  # another model
MANIFEST = "1" * 64
OTHER_MANIFEST = "2" * 64

PER_PATHOLOGY_COLUMNS = [
    "pathology", "method", "kind", "n", "iou_mean", "iou_mean_lo", "iou_mean_hi", "iou_median",
    "pointing_rate", "pointing_lo", "pointing_hi", "iobb_hit_0.1_rate", "iobb_hit_0.25_rate",
    "iobb_hit_0.5_rate", "iou_hit_0.1_rate", "iou_hit_0.25_rate", "iou_hit_0.5_rate", "verdict",
    "criteria",
]


def row(pathology: str, method: str, iou: tuple[float, float, float],
        pointing: tuple[float, float, float], verdict: str, kind: str = "method",
        n: int = 20) -> dict:
    mean, lo, hi = iou
    p, p_lo, p_hi = pointing
    return {
        "pathology": pathology, "method": method, "kind": kind, "n": n,
        "iou_mean": mean, "iou_mean_lo": lo, "iou_mean_hi": hi, "iou_median": mean,
        "pointing_rate": p, "pointing_lo": p_lo, "pointing_hi": p_hi,
        "iobb_hit_0.1_rate": 0.9, "iobb_hit_0.25_rate": 0.7, "iobb_hit_0.5_rate": 0.4,
        "iou_hit_0.1_rate": 0.8, "iou_hit_0.25_rate": 0.5, "iou_hit_0.5_rate": 0.2,
        "verdict": verdict,
        "criteria": "" if kind == "baseline" else "pointing_lo > centre_prior pointing",
    }


N_IMAGES = 20  # image-finding units per (pathology, method) in the box tables below


def box_rows(pathology: str, method: str, iou: list[float], hits: list[bool]) -> list[dict]:
    """Box rows (one box per image) of one pathology and method, as run directories hold them."""
    return [{"image_key": f"{pathology}-{i}.png", "sha256": f"sha-{pathology}-{i}",
             "finding": pathology, "model_finding": pathology, "pathology": pathology,
             "box_index": 0, "method": method, "iou": v, "iobb": v, "coverage": v,
             "pointing_hit": h, "best_match": True}
            for i, (v, h) in enumerate(zip(iou, hits, strict=True))]


BASE_IOU = [0.2 + 0.02 * i for i in range(N_IMAGES)]
BASE_HITS = [i % 3 != 0 for i in range(N_IMAGES)]
ALTERNATING = [0.05 if i % 2 else -0.05 for i in range(N_IMAGES)]  # mean 0, both signs


def shifted(values: list[float], by) -> list[float]:
    steps = by if isinstance(by, list) else [by] * len(values)
    return [v + d for v, d in zip(values, steps, strict=True)]


def flip_two(hits: list[bool]) -> list[bool]:
    """One miss becomes a hit and one hit a miss: the rate is unchanged, pairs differ."""
    out = list(hits)
    out[0], out[1] = not out[0], not out[1]
    return out


def make_run_dir(root: Path, run_id: str, started_at: str, rows: list[dict],
                 fingerprint: str = FP_A, manifest_sha256: str = MANIFEST,
                 model_name: str = "densenet121-res224-nih",
                 boxes: list[dict] | None = None) -> Path:
    """A finished run directory as audit/run/ leaves it (the parts the registry reads): run.json,
    per_pathology.csv and, when given, boxes.csv."""
    run_dir = root / run_id
    run_dir.mkdir(parents=True)
    run_json = {
        "run_id": run_id,
        "started_at": started_at,
        "finished_at": started_at,
        "status": "finished",
        "model": {"name": model_name, "fingerprint": fingerprint, "source": "weights",
                  "seed": 0, "published": True},
        "dataset": {"name": "nih_bbox_dev", "manifest_path": "m.csv",
                    "manifest_sha256": manifest_sha256, "n_images": 438, "n_boxes": 491},
        "settings": {"methods": ["gradcam", "gradcampp"], "threshold": 0.15},
    }
    (run_dir / "run.json").write_text(json.dumps(run_json, indent=2))
    pd.DataFrame(rows, columns=PER_PATHOLOGY_COLUMNS).to_csv(
        run_dir / "per_pathology.csv", index=False)
    if boxes is not None:
        pd.DataFrame(boxes).to_csv(run_dir / "boxes.csv", index=False)
    return run_dir


# The old run A and the new run B of the same model on the same manifest. The registry rows carry
# the verdicts; the box tables carry what the regression check pairs.
ROWS_A = [
    row("Mass", "gradcam", (0.40, 0.35, 0.45), (0.60, 0.50, 0.70), "PASS"),
    row("Mass", "gradcampp", (0.40, 0.35, 0.45), (0.60, 0.50, 0.70), "INCONCLUSIVE"),
    row("Nodule", "gradcam", (0.30, 0.25, 0.35), (0.50, 0.40, 0.60), "PASS"),
    row("Atelectasis", "gradcam", (0.20, 0.15, 0.25), (0.40, 0.30, 0.50), "FAIL"),
    row("Mass", "random", (0.10, 0.05, 0.15), (0.20, 0.10, 0.30), "", kind="baseline"),
    row("Effusion", "gradcam", (0.25, 0.20, 0.30), (0.55, 0.45, 0.65), "PASS"),  # only in A
]
ROWS_B = [
    row("Mass", "gradcam", (0.30, 0.25, 0.38), (0.60, 0.50, 0.70), "PASS"),
    row("Mass", "gradcampp", (0.40, 0.30, 0.45), (0.60, 0.48, 0.68), "INCONCLUSIVE"),
    row("Nodule", "gradcam", (0.29, 0.20, 0.36), (0.48, 0.38, 0.58), "FAIL"),
    row("Atelectasis", "gradcam", (0.35, 0.30, 0.40), (0.60, 0.50, 0.70), "PASS"),
    row("Mass", "random", (0.11, 0.06, 0.16), (0.21, 0.11, 0.31), "", kind="baseline"),
    row("Pneumothorax", "gradcam", (0.15, 0.10, 0.20), (0.30, 0.20, 0.40), "FAIL"),  # only in B
]
BOXES_A = [box for r in ROWS_A for box in box_rows(r["pathology"], r["method"], BASE_IOU,
                                                   BASE_HITS)]
BOXES_B = [
    # (1) every image's IoU 0.1 lower: the paired CI lies wholly below 0 -> regression
    *box_rows("Mass", "gradcam", shifted(BASE_IOU, -0.1), BASE_HITS),
    # (2) IoU up on half the images, down on the others; two pointing outcomes swap: noise
    *box_rows("Mass", "gradcampp", shifted(BASE_IOU, ALTERNATING), flip_two(BASE_HITS)),
    # (3) PASS -> FAIL with a paired IoU change that straddles 0: not enough evidence
    *box_rows("Nodule", "gradcam", shifted(shifted(BASE_IOU, ALTERNATING), -0.01), BASE_HITS),
    # (4) an improvement
    *box_rows("Atelectasis", "gradcam", shifted(BASE_IOU, 0.15), [True] * N_IMAGES),
    *box_rows("Mass", "random", BASE_IOU, BASE_HITS),
    *box_rows("Pneumothorax", "gradcam", BASE_IOU, BASE_HITS),
]
# Everything better than A (and no pathology missing): compare(A, U) has no regression.
ROWS_U = [
    row(r["pathology"], r["method"],
        (r["iou_mean"] + 0.1, r["iou_mean_lo"] + 0.1, r["iou_mean_hi"] + 0.1),
        (r["pointing_rate"] + 0.1, r["pointing_lo"] + 0.1, r["pointing_hi"] + 0.1),
        "PASS" if r["kind"] == "method" else "", kind=r["kind"])
    for r in ROWS_A
]
BOXES_U = [dict(r, iou=r["iou"] + 0.1) for r in BOXES_A]

T_A = "2025-11-20T02:00:00+00:00"
T_OTHER_MODEL = "2025-11-21T02:00:00+00:00"
T_OTHER_MANIFEST = "2025-11-22T02:00:00+00:00"
T_B = "2025-11-27T02:00:00+00:00"
T_U = "2025-11-28T02:00:00+00:00"


def make_run_dirs(root: Path) -> dict[str, Path]:
    """Run directories A, B, U, and two runs of another model / another manifest."""
    other_model_rows = [row("Mass", "gradcam", (0.9, 0.85, 0.95), (0.9, 0.8, 1.0), "PASS")]
    return {
        "A": make_run_dir(root, "run-A", T_A, ROWS_A, boxes=BOXES_A),
        "B": make_run_dir(root, "run-B", T_B, ROWS_B, boxes=BOXES_B),
        "U": make_run_dir(root, "run-U", T_U, ROWS_U, boxes=BOXES_U),
        "other_model": make_run_dir(root, "run-other-model", T_OTHER_MODEL, other_model_rows,
                                    fingerprint=FP_OTHER, model_name="resnet50"),
        "other_manifest": make_run_dir(root, "run-other-manifest", T_OTHER_MANIFEST,
                                       other_model_rows, manifest_sha256=OTHER_MANIFEST),
    }


def record(reg: Registry, run_dirs: dict[str, Path], names: tuple[str, ...]) -> Registry:
    """``reg`` after recording the named run directories in that order."""
    for name in names:
        reg.record_run(run_dirs[name])
    return reg


@contextmanager
def registries(url: str) -> Iterator[Callable[[], Registry]]:
    """A factory of registries on ``url``, each disposed of afterwards."""
    made: list[Registry] = []

    def make() -> Registry:
        made.append(Registry(url))
        return made[-1]

    yield make
    for reg in made:
        reg.engine.dispose()


def by_key(table: pd.DataFrame) -> dict[tuple[str, str], dict]:
    return {(r["pathology"], r["method"]): r for r in table.to_dict("records")}

