"""End-to-end tests of `cxr-audit run` (Prefect flows, run directory, resume, Dask, PHI).

Each test runs the real command in a subprocess on a small slice of ../shared/data/nih_bbox_dev
with a random-init model. Prefect runs on the session's real server (conftest.py `prefect_server`)
whose PREFECT_HOME holds its database and the persisted results, so they can be searched too.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.hostile import SENTINEL_BYTES, write_phi_dicom

pytestmark = pytest.mark.slow  # end to end: CI runs it, `-m "not slow"` skips it

SLICE_FINDINGS = ("Cardiomegaly", "Effusion", "Mass", "Pneumothorax")
BOX_COLUMNS_DOC = [
    "run_id", "image_key", "sha256", "finding", "model_finding", "box_index", "box_x", "box_y",
    "box_w", "box_h", "method", "probability", "logit", "iou", "iobb", "pointing_hit", "pred_x",
    "pred_y", "pred_w", "pred_h", "iou_hit_0.1", "iou_hit_0.25", "iou_hit_0.5", "iobb_hit_0.1",
    "iobb_hit_0.25", "iobb_hit_0.5", "threshold",
]
PER_PATHOLOGY_DOC = [
    "pathology", "method", "kind", "n", "iou_mean", "iou_mean_lo", "iou_mean_hi", "iou_median",
    "pointing_rate", "pointing_lo", "pointing_hi", "iobb_hit_0.1_rate", "verdict", "criteria",
]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def prefect_env(prefect_server) -> dict[str, str]:
    """Subprocess environment: the session's Prefect server (its PREFECT_HOME, which holds its
    database, is the one the PHI test searches), one intra-op thread."""
    return prefect_server.client_env(PREFECT_LOGGING_LEVEL="INFO", OMP_NUM_THREADS="1")


def build_slice(nih_dev_dir: Path, root: Path, per_finding: int = 1) -> tuple[Path, Path]:
    """Symlink a few dev images (one per finding) and write their boxes in NIH format."""
    images = root / "images"
    images.mkdir(parents=True)
    with open(nih_dev_dir / "BBox_List_2017_dev.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    chosen: dict[str, list[str]] = {}
    for row in body:
        if row[1] in SLICE_FINDINGS and sum(r[1] == row[1] for r in chosen.values()) < per_finding:
            chosen.setdefault(row[0], row)
    keep = [row for row in body if row[0] in chosen]
    for key in chosen:
        (images / key).symlink_to(nih_dev_dir / "images" / key)
    bboxes = root / "boxes.csv"
    with open(bboxes, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(keep)
    return images, bboxes


def write_config(path: Path, **overrides: object) -> Path:
    settings: dict[str, object] = {
        "random_init": True,
        "methods": ["gradcam", "gradcampp", "integrated_gradients"],
        "metrics": ["localization", "repeatability", "randomization", "fidelity"],
        "ig_steps": 2,  # the plumbing of every family, at the least work that exercises it
        "ig_internal_batch_size": 4,
        "costly_per_pathology": 1,
        "costly_max_pairs": 1,
        "randomization_blocks": ["classifier", "features.denseblock4"],
        "fidelity_step": 0.5,
        "batch_size": 2,
        "progress": False,
    }
    settings.update(overrides)
    lines = ["[audit]"]
    for key, value in settings.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def cxr_audit(args: list[str], env: dict[str, str], timeout: float = 900,
              check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "audit.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"cxr-audit {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("run-*") if p.is_dir())


def comparable(run_dir: Path, name: str) -> pd.DataFrame:
    table = pd.read_parquet(run_dir / f"{name}.parquet")
    table = table.drop(columns=[c for c in ("run_id",) if c in table.columns])
    keys = [c for c in ("image_key", "finding", "model_finding", "box_index", "method", "family",
                        "metric", "step") if c in table.columns]
    return table.sort_values(keys).reset_index(drop=True)


def add_phi_dicom(images: Path, bboxes: Path) -> Path:
    """A DICOM whose every identifying string is the PHI sentinel, with one Mass box."""
    dicom = write_phi_dicom(images / "phi_case.dcm")
    with open(bboxes, "a", newline="") as handle:
        csv.writer(handle).writerow([dicom.name, "Mass", "10", "10", "20", "20", ""])
    return dicom


@pytest.fixture(scope="module")
def small_run(nih_dev_dir: Path, prefect_env: dict[str, str],
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Every method and metric family on one dev image per finding plus a DICOM carrying PHI
    (a mixed folder, as a site's export would be)."""
    root = tmp_path_factory.mktemp("e2e")
    images, bboxes = build_slice(nih_dev_dir, root)
    dicom = add_phi_dicom(images, bboxes)
    config = write_config(root / "audit.toml")
    out = root / "out"
    registry = root / "registry.sqlite"
    proc = cxr_audit(["run", "--images", str(images), "--bboxes", str(bboxes), "--config",
                      str(config), "--out", str(out), "--registry", str(registry)], prefect_env)
    dirs = run_dirs(out)
    assert len(dirs) == 1, proc.stdout
    return {"root": root, "images": images, "bboxes": bboxes, "config": config, "out": out,
            "registry": registry, "run_dir": dirs[0], "proc": proc, "dicom": dicom}


CHEAP = {"methods": ["gradcam", "gradcampp"], "metrics": ["localization"], "batch_size": 1}


@pytest.fixture(scope="module")
def cheap_run(nih_dev_dir: Path, prefect_env: dict[str, str],
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Grad-CAM and Grad-CAM++ localization of one dev image per finding, one image per batch,
    with the default runner: the reference of the resume and Dask tests."""
    root = tmp_path_factory.mktemp("cheap")
    images, bboxes = build_slice(nih_dev_dir, root)
    config = write_config(root / "audit.toml", **CHEAP)
    cxr_audit(["run", "--images", str(images), "--bboxes", str(bboxes), "--config",
               str(config), "--out", str(root / "out"), "--registry",
               str(root / "reg.sqlite")], prefect_env)
    return run_dirs(root / "out")[0]


def test_run_writes_every_documented_file_with_documented_columns(small_run: dict) -> None:
    run_dir: Path = small_run["run_dir"]
    for name in ("run.json", "boxes.parquet", "boxes.csv", "images.parquet", "curves.parquet",
                 "per_pathology.csv", "per_pathology.json", "rejects.csv", "report.html"):
        assert (run_dir / name).is_file(), name
    boxes = pd.read_parquet(run_dir / "boxes.parquet")
    assert set(BOX_COLUMNS_DOC) <= set(boxes.columns)
    assert set(boxes["method"]) >= {"gradcam", "gradcampp", "integrated_gradients", "random",
                                    "centre_prior", "average_box"}
    assert set(boxes["finding"]) >= set(SLICE_FINDINGS)
    per = pd.read_csv(run_dir / "per_pathology.csv")
    assert set(PER_PATHOLOGY_DOC) <= set(per.columns)
    images = pd.read_parquet(run_dir / "images.parquet")
    for column in ("determinism_max_abs_diff", "noise_ssim", "shift_ssim",
                   "randomization_final_spearman_abs", "fidelity_deletion_auc",
                   "fidelity_insertion_auc"):
        assert column in images.columns and images[column].notna().any(), column
    curves = pd.read_parquet(run_dir / "curves.parquet")
    assert {"randomization_cascade", "deletion", "insertion"} <= set(curves["family"])


def test_run_json_hashes_match_the_inputs(small_run: dict) -> None:
    from audit.model import load_model

    run_dir: Path = small_run["run_dir"]
    run = json.loads((run_dir / "run.json").read_text())
    manifest = Path(run["dataset"]["manifest_path"])
    assert run["dataset"]["manifest_sha256"] == _sha(manifest)
    sidecar = json.loads(manifest.with_suffix(".json").read_text())
    for image in small_run["images"].iterdir():
        assert sidecar["images"][image.name] == _sha(image.resolve())
    boxes = pd.read_parquet(run_dir / "boxes.parquet")
    for key, sha in boxes[["image_key", "sha256"]].drop_duplicates().itertuples(index=False):
        assert sha == _sha((small_run["images"] / key).resolve())
    assert run["model"]["fingerprint"] == load_model(random_init=True, seed=0,
                                                     device="cpu").fingerprint
    assert run["model"]["memory_format"] == "channels_last"  # the CPU's (audit.model)
    for name, digest in run["files"].items():
        assert _sha(run_dir / name) == digest, name
    assert run["settings"]["ig_steps"] == 2  # from the config file
    assert run["status"] == "finished" and run["versions"]["torch"]


def test_history_lists_the_run_and_report_rerenders_without_touching_it(
        small_run: dict, prefect_env: dict[str, str], tmp_path: Path) -> None:
    run_dir: Path = small_run["run_dir"]
    proc = cxr_audit(["history", "--registry", str(small_run["registry"])], prefect_env)
    assert run_dir.name in proc.stdout
    before = {p.name: _sha(p) for p in run_dir.iterdir() if p.is_file()}
    html = tmp_path / "again.html"
    cxr_audit(["report", str(run_dir), "--out", str(html)], prefect_env)
    assert html.stat().st_size > 1000
    after = {p.name: _sha(p) for p in run_dir.iterdir() if p.is_file()}
    assert before == after


def test_killed_run_resumes_without_recomputing_finished_batches(
        nih_dev_dir: Path, prefect_env: dict[str, str], cheap_run: Path, tmp_path: Path) -> None:
    images, bboxes = build_slice(nih_dev_dir, tmp_path / "data", per_finding=1)
    config = write_config(tmp_path / "audit.toml", **CHEAP)
    out = tmp_path / "out"
    args = ["run", "--images", str(images), "--bboxes", str(bboxes), "--config", str(config),
            "--out", str(out), "--registry", str(tmp_path / "reg.sqlite")]
    log = out / ".cache" / "computed.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "audit.cli", *args], env=prefect_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            break
        if proc.poll() is not None:
            pytest.fail("the run finished before it could be killed")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = [json.loads(line)["key"] for line in log.read_text().splitlines()]
    assert 2 <= len(first) and not run_dirs(out)

    cxr_audit(args, prefect_env)
    lines = [json.loads(line)["key"] for line in log.read_text().splitlines()]
    second = lines[len(first):]
    n_batches = len(list(images.iterdir()))  # batch_size 1
    assert sorted(first + second) == sorted(set(first + second))  # nothing computed twice
    assert len(set(first + second)) == n_batches
    resumed = run_dirs(out)
    assert len(resumed) == 1
    # equal to an uninterrupted run of the same images and settings
    pd.testing.assert_frame_equal(comparable(resumed[0], "boxes"), comparable(cheap_run, "boxes"))
    per_a = pd.read_csv(resumed[0] / "per_pathology.csv")
    per_b = pd.read_csv(cheap_run / "per_pathology.csv")
    pd.testing.assert_frame_equal(per_a, per_b)


def test_dask_runner_gives_identical_tables(nih_dev_dir: Path, prefect_env: dict[str, str],
                                            cheap_run: Path, tmp_path: Path) -> None:
    """The cheap audit (`cheap_run`) on a local Dask cluster of two worker processes gives the
    default runner's tables."""
    images, bboxes = build_slice(nih_dev_dir, tmp_path / "data")
    config = write_config(tmp_path / "audit.toml", **CHEAP)
    out = tmp_path / "dask"
    cxr_audit(["run", "--images", str(images), "--bboxes", str(bboxes), "--config",
               str(config), "--out", str(out), "--runner", "dask", "--dask-workers", "2",
               "--registry", str(tmp_path / "dask.sqlite")], prefect_env)
    for name in ("boxes", "images"):
        pd.testing.assert_frame_equal(comparable(cheap_run, name),
                                      comparable(run_dirs(out)[0], name))


def test_phi_sentinel_appears_in_no_output(small_run: dict, prefect_env: dict[str, str]
                                           ) -> None:
    run_dir: Path = small_run["run_dir"]
    proc = small_run["proc"]
    boxes = pd.read_parquet(run_dir / "boxes.parquet")
    assert small_run["dicom"].name in set(boxes["image_key"])  # the DICOM went through the run
    assert SENTINEL_BYTES not in (proc.stdout + proc.stderr).encode()
    searched = 0
    for folder in (small_run["out"], Path(prefect_env["PREFECT_HOME"])):
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert SENTINEL_BYTES not in path.read_bytes(), path
                searched += 1
    assert SENTINEL_BYTES not in small_run["registry"].read_bytes()
    assert searched > 10
