"""`cxr-audit verify`: an untouched run verifies (exit 0); a flipped byte in any file, an edited
table value (with run.json re-hashed so that only re-derivation can catch it), an edited
run.json field, a swapped image: each exits 1 and names what differs; an unreadable run exits
2; a different environment warns and says how, without failing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from audit.cli import app
from audit.model import load_model
from audit.store.files import atomic_write_json, atomic_write_table
from audit.store.rundir import PER_PATHOLOGY_TP, RUN_JSON, hashed_files, read_run_json
from audit.store.verify import FAIL, OK, WARN, check_files, exit_code, verify_run
from tests.run_fixtures import TinyRun, build_run, demo_set_with_dicoms

pytestmark = pytest.mark.slow  # builds and verifies finished runs: CI runs it


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """Four images of the demo's phantom set (three as DICOMs), a random model, Grad-CAM and
    the centre prior, maps saved."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("verify")
    images, boxes = demo_set_with_dicoms(root, n_images=4, n_dicom=3)
    model = load_model(random_init=True, seed=0, device="cpu")
    return build_run(model, images, boxes, root, baselines=("centre_prior",))


@pytest.fixture
def copy(tiny: TinyRun, tmp_path: Path) -> Path:
    """A copy of the tiny run to tamper with (a finished run is never modified)."""
    return Path(shutil.copytree(tiny.run_dir, tmp_path / tiny.run_dir.name))


def _failed(checks) -> dict[str, str]:
    return {c.name: c.detail for c in checks if c.status == FAIL}


def _reseal(run_dir: Path) -> None:
    """Re-hash run.json's files, as a forger who edits a table would."""
    run = read_run_json(run_dir)
    run["files"] = hashed_files(run_dir)
    atomic_write_json(run_dir / RUN_JSON, run)


def test_untouched_run_verifies_with_exit_0(tiny: TinyRun) -> None:
    result = CliRunner().invoke(app, ["verify", str(tiny.run_dir)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in ("files", "boxes.csv", "per_pathology.csv", "paired.csv", "per_pathology.json",
                 "probabilities", "registry", "manifest", "images"):
        assert any(line.startswith(f"OK   {name}: ") for line in lines), (name, result.output)
    assert lines[-1] == "verified: every check holds"
    recorded = read_run_json(tiny.run_dir)["files"]
    assert {"report.html", "summary.md", "maps/gradcam.npz"} <= set(recorded)
    assert any(name.startswith("thumbs/") for name in recorded)


# Files that a check besides the hashes reads (tables, JSON): a flipped byte there must not make
# that check crash; the other files (thumbnails, maps, report) only the files check reads.
PARSED_SUFFIXES = (".parquet", ".csv", ".json")


def test_flipping_one_byte_of_any_file_is_caught_and_named(tiny: TinyRun, tmp_path: Path
                                                           ) -> None:
    run_dir = Path(shutil.copytree(tiny.run_dir, tmp_path / tiny.run_dir.name))
    run = read_run_json(run_dir)
    names = sorted(run["files"])
    assert len(names) >= 12 and any(not n.endswith(PARSED_SUFFIXES) for n in names)
    for name in names:
        path = run_dir / name
        original = path.read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        if name.endswith(PARSED_SUFFIXES):
            checks = verify_run(run_dir)
            assert exit_code(checks) == 1, name
        else:
            checks = [check_files(run_dir, run)]
        assert f"{name} changed" in _failed(checks)["files"], (name, _failed(checks))
        path.write_bytes(original)
    assert exit_code(verify_run(run_dir)) == 0  # every byte restored


def test_an_unrecorded_or_missing_file_is_named(copy: Path) -> None:
    (copy / "notes.txt").write_text("added later")
    (copy / "summary.md").unlink()
    detail = _failed(verify_run(copy))["files"]
    assert "notes.txt not recorded in run.json" in detail and "summary.md missing" in detail


def test_a_pdf_printed_after_the_run_is_named_unsealed_not_failed(copy: Path) -> None:
    (copy / "report.pdf").write_bytes(b"%PDF-1.4 printed later")
    checks = {c.name: c for c in verify_run(copy)}
    assert exit_code(list(checks.values())) == 0
    assert checks["files"].status == WARN
    assert "added after the run finished, not sealed: report.pdf" in checks["files"].detail


def test_edited_per_pathology_value_is_caught_by_re_derivation(copy: Path) -> None:
    table = pd.read_csv(copy / "per_pathology.csv")
    row = table.index[table["method"] == "gradcam"][0]
    stored = table.loc[row, "iou_mean"]
    table.loc[row, "iou_mean"] = stored + 0.05
    atomic_write_table(table, copy / "per_pathology.csv")
    _reseal(copy)
    checks = verify_run(copy)
    failed = _failed(checks)
    assert "files" not in failed  # re-hashed: only re-derivation can tell
    assert "iou_mean: stored" in failed["per_pathology.csv"]
    assert f"{table.loc[row, 'pathology']}/gradcam" in failed["per_pathology.csv"]
    assert "iou_mean" in failed["registry"]  # the registry recorded the true value
    result = CliRunner().invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1 and "FAIL per_pathology.csv:" in result.output


def test_edited_boxes_value_is_caught_in_the_csv_and_the_derived_tables(copy: Path) -> None:
    boxes = pd.read_parquet(copy / "boxes.parquet")
    row = boxes.index[boxes["method"] == "gradcam"][0]
    boxes.loc[row, "iou"] = 1.0 - boxes.loc[row, "iou"]
    atomic_write_table(boxes, copy / "boxes.parquet")
    _reseal(copy)
    failed = _failed(verify_run(copy))
    assert "files" not in failed
    assert "iou: stored" in failed["boxes.csv"]
    assert "iou_mean: stored" in failed["per_pathology.csv"]


def test_edited_csv_value_alone_is_caught(copy: Path) -> None:
    text = (copy / "boxes.csv").read_text().splitlines()
    cells = text[1].split(",")
    column = text[0].split(",").index("probability")
    cells[column] = "0.999"
    (copy / "boxes.csv").write_text("\n".join([text[0], ",".join(cells), *text[2:]]) + "\n")
    _reseal(copy)
    failed = _failed(verify_run(copy))
    assert set(failed) == {"boxes.csv"} and "probability: stored 0.999" in failed["boxes.csv"]


def test_edited_probability_is_caught_across_tables(copy: Path) -> None:
    images = pd.read_parquet(copy / "images.parquet")
    images.loc[0, "logit"] = images.loc[0, "logit"] + 1.0
    atomic_write_table(images, copy / "images.parquet")
    _reseal(copy)
    failed = _failed(verify_run(copy))
    assert set(failed) == {"probabilities"}
    assert images.loc[0, "image_key"] in failed["probabilities"]
    assert "logit" in failed["probabilities"]


def test_edited_run_json_field_is_caught_by_the_registry(copy: Path) -> None:
    run = read_run_json(copy)
    run["model"]["fingerprint"] = "0" * 64
    atomic_write_json(copy / RUN_JSON, run)
    failed = _failed(verify_run(copy))
    assert set(failed) == {"registry"} and "model_fingerprint" in failed["registry"]


def test_swapped_image_is_caught_and_named(tiny: TinyRun, tmp_path: Path) -> None:
    images = Path(shutil.copytree(tiny.images_dir, tmp_path / "images"))
    first, second = sorted(images.rglob("*.dcm"))[:2]
    first.write_bytes(second.read_bytes())
    checks = verify_run(tiny.run_dir, images_dir=images)
    assert exit_code(checks) == 1
    assert _failed(checks)["images"].startswith(f"{first.name} changed")
    assert exit_code(verify_run(tiny.run_dir, images_dir=tiny.images_dir)) == 0


def test_unreadable_run_exits_2(copy: Path, tmp_path: Path) -> None:
    (copy / RUN_JSON).write_text("{not json")
    result = CliRunner().invoke(app, ["verify", str(copy)])
    assert result.exit_code == 2 and "cannot read" in result.output
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "nowhere")])
    assert result.exit_code == 2


def test_a_different_environment_warns_and_says_how(copy: Path) -> None:
    run = read_run_json(copy)
    env = run["environment"]
    env["distributions"]["numpy"] = "0.0.1"
    env["distributions"]["made-up-package"] = "1.0"
    env["cpu"]["logical_cores"] = 1000
    atomic_write_json(copy / RUN_JSON, run)
    checks = {c.name: c for c in verify_run(copy)}
    assert exit_code(list(checks.values())) == 0  # a warning, not a failure
    distributions = checks["environment.distributions"]
    assert distributions.status == WARN
    assert "numpy: 0.0.1 -> " in distributions.detail
    assert "made-up-package: 1.0 -> absent" in distributions.detail
    assert checks["environment.cpu"].status == WARN
    assert "logical_cores: 1000 -> " in checks["environment.cpu"].detail
    assert checks["environment.python"].status == OK


def test_registry_without_the_run_fails_and_no_registry_skips(copy: Path, tmp_path: Path
                                                               ) -> None:
    from audit.store.registry import Registry

    empty = tmp_path / "empty.sqlite"
    Registry(str(empty))
    failed = _failed(verify_run(copy, registry=str(empty)))
    assert "is not recorded" in failed["registry"]
    run = read_run_json(copy)
    run["settings"]["registry"] = None
    atomic_write_json(copy / RUN_JSON, run)
    checks = {c.name: c for c in verify_run(copy)}
    assert checks["registry"].status == "SKIP"


def test_edited_true_positive_subset_is_caught_by_re_derivation(copy: Path) -> None:
    """per_pathology_tp.csv is re-derived too: a forged row (or an edited value) fails."""
    tp_path = copy / PER_PATHOLOGY_TP
    table = pd.read_csv(tp_path) if tp_path.stat().st_size > 1 else pd.DataFrame()
    if table.empty:  # the random model called no boxed image positive: forge one row
        source = pd.read_csv(copy / "per_pathology.csv")
        table = source.drop(columns=["verdict", "criteria"], errors="ignore").iloc[:1]
    else:
        table.loc[table.index[0], "iou_mean"] = table.loc[table.index[0], "iou_mean"] + 0.05
    atomic_write_table(table, tp_path)
    _reseal(copy)
    failed = _failed(verify_run(copy))
    assert "files" not in failed  # re-hashed: only re-derivation can tell
    assert PER_PATHOLOGY_TP in failed, failed
