"""The built-in default: audit the three phantom reference models and check the calibration."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from audit.config import AuditSettings
from audit.metrics.randomization import DENSENET_CASCADE_SHORT
from flows.audit import audit_flow_body, ingest_flow, report_and_finish

DEMO_IMAGES = 24
DEMO_SEED = 20261128


def demo_dataset(out: Path, n_images: int, seed: int) -> Any:
    """Phantom test set: a laterality marker present exactly when a Mass is (masses visible)."""
    from audit.phantom import PhantomConfig, write_phantom_dataset

    base = PhantomConfig()
    config = replace(base, shortcut=True, faint_mass_amplitude=base.mass_amplitude)
    return write_phantom_dataset(out, n_images=n_images, seed=seed, config=config, shortcut=True)


def reference_models() -> dict[str, dict[str, Any]]:
    """Model settings of the three reference models (shipped weights are sha256-verified)."""
    from audit.phantom_train import WEIGHTS_DIR, load_phantom_weights, read_manifest

    manifest = read_manifest()
    models: dict[str, dict[str, Any]] = {}
    for kind in ("honest", "shortcut"):
        load_phantom_weights(kind)  # raises when the file does not match its manifest
        models[kind] = {"checkpoint": str(WEIGHTS_DIR / manifest["models"][kind]["file"])}
    models["random"] = {"random_init": True, "model_seed": 0}
    return models


@flow(name="demo")
def demo_flow(out: str = "reports/demo", n_images: int = DEMO_IMAGES, seed: int = DEMO_SEED,
              ig_steps: int = 8, registry: str | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Phantom -> ingest -> audit honest/shortcut/random -> reports -> calibration."""
    from audit.calibration import calibrate
    from audit.phantom import marker_box
    from audit.report import render_side_by_side

    logger = get_run_logger()
    out_dir = Path(out)
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    dataset = demo_dataset(out_dir / "phantom", n_images, seed)
    timings["phantom"] = time.perf_counter() - tick
    tick = time.perf_counter()
    ingested = ingest_flow(str(dataset.images_dir.parent), str(dataset.bbox_csv),
                           str(dataset.labels_csv), "phantom_demo", str(out_dir / "manifests"))
    timings["ingest"] = time.perf_counter() - tick
    registry = registry or str(out_dir / "registry.sqlite")
    base = AuditSettings(
        manifest=ingested["manifest_csv"], random_init=True, out=str(out_dir / "runs"),
        ig_steps=ig_steps, costly_per_pathology=1, costly_max_pairs=2, save_maps=True,
        randomization_blocks=list(DENSENET_CASCADE_SHORT), fidelity_step=0.1,
        registry=registry, batch_size=8, progress=progress,
        acceptance=[{"pathology": "*", "method": "*", "metric": "pointing_rate", "op": ">=",
                     "value": 0.5, "use": "estimate"}],
    )
    runs: dict[str, Path] = {}
    for kind, model in reference_models().items():
        tick = time.perf_counter()
        settings = replace(base, random_init=False, **model).validate()
        run, _ = audit_flow_body(ingested["manifest_csv"], settings)
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
