"""Small finished run directories built in-process (no Prefect): ingest, one batch, assemble,
report, finish, record in a registry: the same library calls the `audit` flow makes. Used by
the verify and DICOM export tests."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from audit.config import build_settings
from audit.data.manifest import ingest, read_manifest, read_sidecar
from audit.run import plan
from audit.run.assemble import RunContext, assemble_run
from audit.run.batch import audit_batch
from audit.store.registry import Registry
from audit.store.rundir import RunDirectory, new_run_id


@dataclass(frozen=True)
class TinyRun:
    run_dir: Path
    registry: Path
    images_dir: Path
    manifest_csv: Path


def build_run(model: Any, images_dir: Path, bboxes_csv: Path, root: Path, *,
              methods: tuple[str, ...] = ("gradcam",), baselines: tuple[str, ...] = (),
              save_maps: bool = True, **settings: Any) -> TinyRun:
    """A finished run of ``model`` on the images and boxes given, under ``root``."""
    manifest_csv = ingest(images_dir, bboxes_csv=bboxes_csv, name="tiny",
                          out_dir=root / "manifests", workers=1, progress=False).manifest_csv
    return build_run_of_manifest(model, manifest_csv, root, methods=methods,
                                 baselines=baselines, save_maps=save_maps, **settings)


def build_run_of_manifest(model: Any, manifest_csv: Path, root: Path, *,
                          methods: tuple[str, ...] = ("gradcam",),
                          baselines: tuple[str, ...] = (), save_maps: bool = True,
                          **settings: Any) -> TinyRun:
    """A finished run of ``model`` on an ingested manifest, under ``root`` (one batch)."""
    registry = root / "registry.sqlite"
    values = {"manifest": str(manifest_csv), "random_init": True, "methods": list(methods),
              "baselines": list(baselines), "metrics": ["localization"], "batch_size": 8,
              "progress": False, "save_maps": save_maps, "out": str(root / "runs"),
              "registry": str(registry), **settings}
    run_settings = build_settings(values, {})
    selection = plan.select_images(read_manifest(manifest_csv), run_settings)
    sidecar = read_sidecar(manifest_csv)
    batch = audit_batch(model, selection.manifest, Path(sidecar["images_dir"]), run_settings,
                        [], root / "batch")
    started = datetime.now(timezone.utc)
    run = RunDirectory.create(root / "runs", new_run_id(started, salt=model.fingerprint))
    context = RunContext(selection=selection, settings=run_settings, model=model,
                         manifest_csv=manifest_csv, manifest_sidecar=sidecar,
                         started_at=started, timings={}, host="test")
    assemble_run(run, [batch], context)
    from audit.report import render_report

    render_report(run.staging)
    final = run.finish()
    Registry(str(registry)).record_run(final)
    return TinyRun(final, registry, Path(sidecar["images_dir"]), manifest_csv)


def demo_set_with_dicoms(root: Path, n_images: int, n_dicom: int) -> tuple[Path, Path]:
    """The demo's phantom set (`flows.demo.demo_dataset`, the demo's seed), its first
    ``n_dicom`` images as DICOMs only (alternating MONOCHROME2 / MONOCHROME1), the rest as
    PNGs: ``(folder to ingest, box list naming the DICOMs)``."""
    from audit.phantom import DEMO_SEED
    from flows.demo import demo_dataset

    dataset = demo_dataset(root / "phantom", n_images, DEMO_SEED, n_dicom=n_dicom)
    for dicom in dataset.dicoms:
        (dataset.images_dir / dicom.with_suffix(".png").name).unlink()
    renamed = {d.with_suffix(".png").name: d.name for d in dataset.dicoms}
    bboxes = root / "boxes_with_dicoms.csv"
    with open(dataset.bbox_csv, newline="") as src, open(bboxes, "w", newline="") as dst:
        rows = list(csv.reader(src))
        csv.writer(dst).writerows([rows[0]] + [[renamed.get(r[0], r[0]), *r[1:]]
                                               for r in rows[1:]])
    return dataset.root, bboxes
