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
from audit.phantom import DEMO_IG_STEPS, DEMO_IMAGES, DEMO_SEED
from flows.audit import audit_flow_body, ingest_flow, report_and_finish


def demo_datasets(out: Path, n_images: int, seed: int) -> dict[str, Any]:
    """Two phantom test sets: the standard one (honest and random models) and the shortcut one
    (a laterality marker present exactly when a faint Mass is), where the shortcut model is
    right for the wrong reason."""
    from audit.phantom.dataset import write_phantom_dataset

    return {
        "standard": write_phantom_dataset(out / "standard", n_images=n_images, seed=seed),
        "shortcut": write_phantom_dataset(out / "shortcut", n_images=n_images, seed=seed + 1,
                                          shortcut=True),
    }


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
              ig_steps: int = DEMO_IG_STEPS, registry: str | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Phantom -> ingest -> audit honest/shortcut/random -> reports -> calibration."""
    from audit.phantom.calibration import calibrate
    from audit.phantom.generate import marker_box
    from audit.report import render_side_by_side

    logger = get_run_logger()
    out_dir = Path(out)
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    datasets = demo_datasets(out_dir / "phantom", n_images, seed)
    timings["phantom"] = time.perf_counter() - tick
    tick = time.perf_counter()
    manifests = {
        name: ingest_flow(str(ds.root), str(ds.bbox_csv), str(ds.labels_csv),
                          f"phantom_{name}", str(out_dir / "manifests"))["manifest_csv"]
        for name, ds in datasets.items()
    }
    timings["ingest"] = time.perf_counter() - tick
    registry = registry or str(out_dir / "registry.sqlite")
    base = AuditSettings(
        manifest=manifests["standard"], random_init=True, out=str(out_dir / "runs"),
        ig_steps=ig_steps, costly_per_pathology=1, costly_max_pairs=1, save_maps=True,
        randomization_blocks=list(DENSENET_CASCADE_SHORT), fidelity_step=0.125,
        registry=registry, batch_size=8, progress=progress,
        acceptance=[{"pathology": "*", "method": "*", "metric": "pointing_rate", "op": ">=",
                     "value": 0.5, "use": "estimate"}],
    )
    runs: dict[str, Path] = {}
    for kind, model in reference_models().items():
        tick = time.perf_counter()
        manifest = manifests["shortcut" if kind == "shortcut" else "standard"]
        settings = replace(base, **{"random_init": False, "manifest": manifest, **model})
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
