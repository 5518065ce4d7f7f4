"""The built-in default: audit the three phantom reference models and check the calibration."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from audit.config import AuditSettings
from audit.metrics.randomization import DENSENET_CASCADE_SHORT
from audit.phantom import (
    DEMO_COSTLY_PAIRS,
    DEMO_COSTLY_PER_PATHOLOGY,
    DEMO_CRITERIA,
    DEMO_IMAGES,
    DEMO_METHODS,
    DEMO_METRICS,
    DEMO_PREVALENCE,
    DEMO_SEED,
)
from flows.audit import audit_flow_body, ingest_flow, report_and_finish


def demo_dataset(out: Path, n_images: int, seed: int, n_dicom: int = 0) -> Any:
    """The one phantom test set the three models are audited on: the laterality marker
    accompanies every Mass (the spurious correlation holds, as at the site where the shortcut
    was learned) and the Masses are visible, so a model that localizes must look past the
    marker, and the shortcut model is right for the wrong reason. The demo writes no DICOM
    (``n_dicom``: the first images also as DICOMs, for the DICOM export's tests)."""
    from audit.phantom.dataset import write_phantom_dataset
    from audit.phantom.generate import FINDINGS, PhantomConfig

    config = PhantomConfig(marker_with_mass=True,
                           prevalence={f: DEMO_PREVALENCE for f in FINDINGS})
    return write_phantom_dataset(out, n_images=n_images, seed=seed, n_dicom=n_dicom,
                                 config=config)


def reference_models() -> dict[str, dict[str, Any]]:
    """Model settings of the three reference models (shipped weights are sha256-verified)."""
    from audit.phantom.models import WEIGHTS_DIR, load_phantom_weights, read_manifest

    manifest = read_manifest()
    models: dict[str, dict[str, Any]] = {}
    for kind in ("honest", "shortcut"):
        load_phantom_weights(kind)  # raises when the file does not match its manifest
        models[kind] = {"checkpoint": str(WEIGHTS_DIR / manifest["models"][kind]["file"])}
    models["random"] = {"random_init": True, "model_seed": 0}
    return models


@flow(name="demo", task_runner=ThreadPoolTaskRunner(max_workers=1))
def demo_flow(out: str = "reports/demo", n_images: int = DEMO_IMAGES, seed: int = DEMO_SEED,
              registry: str | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Phantom -> ingest -> audit honest/shortcut/random -> reports -> calibration."""
    from audit.phantom.calibration import calibrate
    from audit.phantom.generate import marker_box
    from audit.report import render_side_by_side

    logger = get_run_logger()
    out_dir = Path(out)
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    dataset = demo_dataset(out_dir / "phantom", n_images, seed)
    timings["phantom"] = time.perf_counter() - tick
    tick = time.perf_counter()
    manifest = ingest_flow(str(dataset.root), str(dataset.bbox_csv), str(dataset.labels_csv),
                           "phantom_demo", str(out_dir / "manifests"))["manifest_csv"]
    timings["ingest"] = time.perf_counter() - tick
    registry = registry or str(out_dir / "registry.sqlite")
    base = AuditSettings(
        manifest=manifest, random_init=True, out=str(out_dir / "runs"),
        methods=list(DEMO_METHODS), metrics=list(DEMO_METRICS),
        costly_per_pathology=DEMO_COSTLY_PER_PATHOLOGY,
        costly_max_pairs=DEMO_COSTLY_PAIRS, save_maps=True,
        randomization_blocks=list(DENSENET_CASCADE_SHORT),
        registry=registry, batch_size=8, progress=progress,
        acceptance=[dict(c) for c in DEMO_CRITERIA],
    )
    runs: dict[str, Path] = {}
    for kind, model in reference_models().items():
        tick = time.perf_counter()
        settings = replace(base, **{"random_init": False, **model})
        run, _ = audit_flow_body(manifest, settings.validate())
        run_dir, _ = report_and_finish(run, registry)
        runs[kind] = Path(run_dir)
        timings[f"audit {kind}"] = time.perf_counter() - tick
        logger.info("%s model audited in %.1f s: %s", kind, timings[f"audit {kind}"], run_dir)
    result = calibrate(runs, marker_box=marker_box(1024))
    html = render_side_by_side(list(runs.values()), out_dir / "demo_report.html",
                               calibration=result.checks_table(),
                               labels=list(runs.keys()))
    result.table.to_csv(out_dir / "calibration.csv", index=False)
    (out_dir / "runs.txt").write_text("".join(f"{k}\t{v}\n" for k, v in runs.items()))
    result.checks_table().to_csv(out_dir / "calibration_checks.csv", index=False)
    logger.info("calibration %s", "PASSED" if result.passed else "FAILED")
    return {"report": str(html), "runs": {k: str(v) for k, v in runs.items()},
            "passed": result.passed, "timings": timings,
            "checks": result.checks_table().to_dict("records")}
