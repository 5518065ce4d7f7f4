"""The audit certificate (the report's first page): known answers from a synthetic run, and the
printed footer's report sha256 (the Chromium side is in test_report_browser.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from report_fixtures import build_run_dir

from audit.report import render_report
from audit.report.certificate import REPORT_SHA_SLOT, certificate, costly_pairs
from audit.report.pdf import with_report_sha256
from audit.report.provenance import provenance
from audit.store.rundir import read_run


def _certificate(tmp_path: Path, **kw) -> dict:
    data = read_run(build_run_dir(tmp_path / "run", n_boxes=12, findings=["Mass", "Effusion"],
                                  **kw))
    return certificate(data, provenance(data.run), ["gradcam", "gradcampp", "centre_prior"], 4)


def test_how_names_methods_baselines_layer_and_the_localization_rule(tmp_path):
    how = dict(_certificate(tmp_path)["how"])
    assert how["Saliency methods"] == "Grad-CAM and Grad-CAM++"
    assert how["Baseline maps (the bar a method must beat)"] == "Centre prior (baseline)"
    assert how["CAM target layer"].startswith("features.norm5")
    assert "binarized at 0.15 of its maximum" in how["Localization"]
    assert "± 15 px at 1024 px" in how["Localization"]


def test_limitations_state_the_grid_the_sample_and_the_multiplicity(tmp_path):
    limits = _certificate(tmp_path, curve_images=3)["limitations"]
    text = "\n".join(limits)
    assert "7 × 7 grid (about 146 px per cell at 1024 px)" in text  # 224 px / 32; 1024 / 7
    assert "seeded sample of 3 image–finding pairs" in text  # the curves' pairs
    assert "each of the 4 verdicts" in text
    assert any(t.startswith("Calibration") and "does not show that a PASS" in t for t in limits)


def test_costly_pairs_prefer_the_recorded_sample(tmp_path):
    run = build_run_dir(tmp_path / "run", n_boxes=12, findings=["Mass"], curve_images=3,
                        run_json_extra={"sampled": {"costly_sample": [["a", "Mass"]] * 5}})
    assert costly_pairs(read_run(run)) == 5
    bare = build_run_dir(tmp_path / "bare", n_boxes=12, findings=["Mass"], with_curves=False)
    assert costly_pairs(read_run(bare)) == 0


def test_the_random_model_is_named_a_negative_control(tmp_path):
    limits = _certificate(tmp_path, run_json_extra={"model": {
        "name": "random-init(seed=0)", "source": "random-init"}})["limitations"]
    assert any("negative control" in t for t in limits)


def test_the_printed_copy_names_the_sha256_of_the_report_it_was_printed_from(tmp_path):
    run = build_run_dir(tmp_path / "run", n_boxes=12, findings=["Mass"])
    html = render_report(run, tmp_path / "out" / "report.html")
    text = html.read_text()
    assert text.count(REPORT_SHA_SLOT) == 1 and "Audit certificate" in text
    copy = with_report_sha256(html, tmp_path)
    digest = hashlib.sha256(html.read_bytes()).hexdigest()
    printed = copy.read_text()
    assert REPORT_SHA_SLOT not in printed
    assert f'"\\A report.html sha256 {digest}"' in printed
    assert printed.replace(f'"\\A report.html sha256 {digest}"', REPORT_SHA_SLOT) == text
