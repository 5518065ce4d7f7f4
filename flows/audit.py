"""Prefect wiring of the audit: `ingest` -> `audit` (batches mapped over a task runner) -> `report`.

Tasks pass small things (paths, keys, dicts of settings); maps and tensors stay in the run's cache
folder on disk. A batch task's cache key is built from content (image sha256s, boxes, model
fingerprint, settings, code version), its result (a path) is persisted, and the batch folder
itself is checked first, so a re-run in a new flow run recomputes only unfinished batches.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from audit.config import AuditSettings
from audit.run import plan
from audit.run.assemble import RunContext, assemble_run
from audit.run.batch import audit_batch
from audit.run.images import ImagePrefetcher, auto_workers, image_prefetcher, submit_next
from audit.store.files import sha256_file
from audit.store.registry import Registry
from audit.store.rundir import RunDirectory, new_run_id, read_run_json

CACHE_DIRNAME = ".cache"
COMPUTE_LOG = "computed.jsonl"

_MODELS: dict[tuple[Any, ...], Any] = {}


def _model_for(settings: AuditSettings) -> Any:
    """One loaded model per process (a Dask worker loads its own copy once)."""
    from audit.model import load_model

    spec = (settings.weights, settings.checkpoint, settings.random_init, settings.model_seed,
            settings.device)
    if spec not in _MODELS:
        _MODELS[spec] = load_model(  # applies the fp32 policy (TF32 off)
            weights=settings.weights,
            checkpoint=Path(settings.checkpoint) if settings.checkpoint else None,
            random_init=settings.random_init,
            seed=settings.model_seed,
            device=settings.device,
            allow_download=True,  # by name through torchxrayvision; offline: WeightsUnavailable
        )
    return _MODELS[spec]


_PREFETCHERS: dict[tuple[str, int, int], ImagePrefetcher] = {}


def _prefetcher_for(images_root: str, size: int, workers: int) -> ImagePrefetcher:
    """One image prefetcher per process, image folder and worker count (its workers or threads
    outlive a batch)."""
    spec = (str(images_root), int(size), int(workers))
    if spec not in _PREFETCHERS:
        _PREFETCHERS[spec] = image_prefetcher(Path(spec[0]), spec[1], spec[2])
    return _PREFETCHERS[spec]


def close_prefetchers() -> None:
    """Stop the decode workers of this process."""
    while _PREFETCHERS:
        _PREFETCHERS.popitem()[1].close()


@functools.lru_cache(maxsize=2)
def _read_manifest_cached(path: str, mtime_ns: int, size: int) -> Any:
    from audit.data.manifest import read_manifest

    return read_manifest(Path(path))


def _manifest(manifest_csv: str) -> Any:
    """The manifest, read once per process while the file is unchanged."""
    stat = Path(manifest_csv).stat()
    return _read_manifest_cached(str(manifest_csv), stat.st_mtime_ns, stat.st_size)


def _is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry on resource hiccups (I/O, memory, interrupted connections), not on bad data."""
    try:
        state.result()
    except (OSError, MemoryError, TimeoutError, ConnectionError) as err:
        return not isinstance(err, (FileNotFoundError, IsADirectoryError, PermissionError))
    except Exception:
        return False
    return False


def _batch_dir(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / "batches" / key


def _batch_done(cache_dir: str | Path, key: str) -> bool:
    """Whether batch ``key``'s result folder is complete (its last table is written when the
    staged folder is renamed into place, `audit.run.batch.audit_batch`)."""
    return (_batch_dir(cache_dir, key) / "boxes.parquet").exists()


def _batch_cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    """Prefect's cache entry for a batch is valid only while its result folder exists: the key
    holds the folder's resolved path, and no key is given when the folder is gone (deleted
    output, another --out), so the task runs instead of returning a stale path."""
    cache_dir = Path(parameters["cache_dir"]).resolve()
    if not _batch_done(cache_dir, parameters["key"]):
        return None
    out_dir = _batch_dir(cache_dir, parameters["key"])
    digest = hashlib.sha256(str(out_dir).encode()).hexdigest()[:16]
    return f"cxr-audit-batch-{parameters['key']}-{digest}"


@task(
    name="audit-batch",
    cache_key_fn=_batch_cache_key,
    persist_result=True,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_is_transient,
    task_run_name="batch-{index}",
)
def audit_batch_task(
    index: int,
    key: str,
    image_keys: list[str],
    manifest_csv: str,
    images_root: str,
    settings: dict[str, Any],
    costly: list[list[str]],
    cache_dir: str,
    ig: list[list[str]] | None = None,
    prefetch: tuple[str, list[str]] | None = None,
    decode_workers: int = 0,
) -> str:
    """Explain and score one batch; returns the path of its result folder. ``prefetch``: the
    next batch (key, image keys), decoded ahead (`audit.run.images.submit_next`) in
    ``decode_workers`` processes, or in threads when that is 0."""
    out_dir = _batch_dir(cache_dir, key)
    if _batch_done(cache_dir, key):
        return str(out_dir)
    run_settings = AuditSettings(**settings)
    manifest = _manifest(manifest_csv)
    loader = _prefetcher_for(images_root, run_settings.image_size, decode_workers)
    device_done = None
    if prefetch is not None:
        device_done = submit_next(loader, prefetch[0],
                                  manifest[manifest["image_key"].isin(prefetch[1])])
    rows = manifest[manifest["image_key"].isin(image_keys)]
    model = _model_for(run_settings)
    started = time.perf_counter()
    audit_batch(model, rows, Path(images_root), run_settings, [tuple(p) for p in costly],
                out_dir, loaded=loader.take(key, rows),
                ig_pairs=None if ig is None else [tuple(p) for p in ig], device_done=device_done)
    with open(Path(cache_dir) / COMPUTE_LOG, "a", encoding="utf-8") as log_file:
        log_file.write(json.dumps({"key": key, "index": index, "pid": os.getpid(),
                                   "seconds": round(time.perf_counter() - started, 3)}) + "\n")
    return str(out_dir)


@task(name="render-report", cache_policy=NO_CACHE)
def render_report_task(run_dir: str, previous_run_dir: str | None) -> str:
    """Render the report of a run (inside its folder); returns the HTML path."""
    from audit.report import render_report

    previous = Path(previous_run_dir) if previous_run_dir else None
    return str(render_report(Path(run_dir), previous_run_dir=previous))


def _task_runner(settings: AuditSettings) -> Any:
    """One batch at a time in this process (torch already uses every core for one batch;
    concurrent batches only oversubscribe the CPU or the GPU), or a Dask cluster."""
    if settings.runner != "dask":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": settings.dask_workers,
                                          "threads_per_worker": 1, "processes": True})


@flow(name="ingest")
def ingest_flow(images: str, bboxes: str | None, labels: str | None, name: str,
                out_dir: str = "data_manifests") -> dict[str, Any]:
    """Scan an image folder, join the box list, hash everything, write a manifest."""
    from audit.data.manifest import ingest

    logger = get_run_logger()
    result = ingest(Path(images), bboxes_csv=Path(bboxes) if bboxes else None,
                    labels_csv=Path(labels) if labels else None, name=name,
                    out_dir=Path(out_dir))
    logger.info("ingest %s: %d images, %d boxes, %d rejects", name, result.n_images,
                result.n_boxes, result.n_rejects)
    return {"manifest_csv": str(result.manifest_csv), "rejects_csv": str(result.rejects_csv),
            "json_path": str(result.json_path)}


def audit_flow_body(manifest_csv: str, settings: AuditSettings) -> tuple[RunDirectory, Path]:
    """The body of the `audit` flow (also used by `audit_run`): plan, batches as tasks,
    assemble the run directory in its staging folder."""
    from audit.data.manifest import read_manifest, read_sidecar

    logger = get_run_logger()
    started_at = datetime.now(timezone.utc)
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    manifest_path = Path(manifest_csv)
    sidecar = read_sidecar(manifest_path)
    selection = plan.select_images(read_manifest(manifest_path), settings)
    model = _model_for(settings)
    batches = plan.plan_batches(selection, settings, model.fingerprint)
    cache_dir = Path(settings.out) / CACHE_DIRNAME
    (cache_dir / "batches").mkdir(parents=True, exist_ok=True)
    timings["plan"] = time.perf_counter() - tick
    logger.info("auditing %d images in %d batches with model %s (%s)",
                selection.manifest["image_key"].nunique(), len(batches), model.name,
                model.fingerprint[:12])
    tell_plan(selection, settings, model, Path(sidecar["images_dir"]))

    tick = time.perf_counter()
    # one process runs the batches in turn and decodes the next ahead (not one already done, as
    # in a resumed run); Dask workers each decode their own batch when it comes
    prefetching = settings.runner != "dask"
    workers = auto_workers(settings.prefetch_workers, model.device.type,
                           n_batches=len(batches)) if prefetching else 0
    futures = [audit_batch_task.submit(
        b.index, b.key, b.image_keys, str(manifest_path), sidecar["images_dir"],
        settings.to_dict(), [list(p) for p in b.costly], str(cache_dir),
        ig=None if b.ig is None else [list(p) for p in b.ig],
        prefetch=(nxt.key, nxt.image_keys) if prefetching and nxt is not None
        and not _batch_done(cache_dir, nxt.key) else None,
        decode_workers=workers)
        for b, nxt in zip(batches, [*batches[1:], None], strict=True)]
    try:
        batch_dirs = [Path(f.result()) for f in tqdm(futures, desc="explain+score",
                                                     unit="batch",
                                                     disable=not settings.progress)]
    finally:
        close_prefetchers()
    timings["explain_score"] = time.perf_counter() - tick

    tick = time.perf_counter()
    run = RunDirectory.create(Path(settings.out), new_run_id(started_at, salt=model.fingerprint))
    context = RunContext(selection=selection, settings=settings, model=model,
                         manifest_csv=manifest_path, manifest_sidecar=sidecar,
                         started_at=started_at, timings=timings, host=socket.gethostname())
    staging = assemble_run(run, batch_dirs, context)
    timings["assemble"] = time.perf_counter() - tick
    return run, staging


def tell_plan(selection: plan.Selection, settings: AuditSettings, model: Any,
              images_root: Path) -> None:
    """Print the run's plan and its estimated time (a short calibration of this machine)
    before any batch starts."""
    from audit.run import estimate

    calibration = estimate.calibrate(model, settings, selection.manifest, images_root)
    text = estimate.describe(estimate.run_plan(selection, settings), calibration, settings,
                             str(model.device))
    get_run_logger().info("%s", text)


def report_and_finish(run: RunDirectory, registry: str | None) -> tuple[str, str]:
    """Render the report into the run, finish (rename) it, record it in the registry."""
    from audit.report import render_markdown_summary

    logger = get_run_logger()
    reg = Registry(registry)
    info = read_run_json(run.staging)
    previous = reg.latest_run(info["model"]["fingerprint"], info["dataset"]["manifest_sha256"])
    previous_dir = Path(previous[1]) if previous and Path(previous[1]).exists() else None
    render_report_task(str(run.staging), str(previous_dir) if previous_dir else None)
    summary = render_markdown_summary(run.staging)
    final = run.finish()
    reg.record_run(final)
    create_markdown_artifact(markdown=summary, key="cxr-audit-summary",
                             description=f"cxr-audit run {run.run_id}")
    table = reg.results(run.run_id)
    create_table_artifact(table=json.loads(table.to_json(orient="records")),
                          key="cxr-audit-per-pathology", description=f"run {run.run_id}")
    logger.info("run %s finished: %s", run.run_id, final)
    return str(final), str(final / "report.html")


@flow(name="audit")
def audit_flow(manifest_csv: str, settings: dict[str, Any]) -> str:
    """Explain and score (batches mapped over the task runner), assemble, report, finish."""
    run_settings = AuditSettings(**settings).validate()
    run, _ = audit_flow_body(manifest_csv, run_settings)
    return report_and_finish(run, run_settings.registry)[0]


def audit_run_impl(settings: dict[str, Any]) -> dict[str, str]:
    run_settings = AuditSettings(**settings).validate()
    manifest_csv = run_settings.manifest
    if manifest_csv is None:
        name = run_settings.dataset_name or Path(run_settings.images).name
        ingested = ingest_flow(run_settings.images, run_settings.bboxes, run_settings.labels,
                               name, str(Path(run_settings.out) / "manifests"))
        manifest_csv = ingested["manifest_csv"]
    run, _ = audit_flow_body(manifest_csv, run_settings)
    run_dir, html = report_and_finish(run, run_settings.registry)
    return {"run_dir": run_dir, "report": html, "manifest": str(manifest_csv),
            "manifest_sha256": sha256_file(Path(manifest_csv))}


@flow(name="audit_run")
def audit_run(settings: dict[str, Any]) -> dict[str, str]:
    """Parent flow: ingest (when given images) -> audit -> report."""
    return audit_run_impl(settings)


def run_with_runner(settings: AuditSettings) -> dict[str, str]:
    """Run `audit_run` with the task runner the settings ask for."""
    return audit_run.with_options(task_runner=_task_runner(settings))(settings.to_dict())
