"""Pipeline benchmark: the library pipeline (`select_images` -> `plan_batches` -> image
prefetch -> `audit_batch`, no Prefect) on N images, against its floor timed in the same run.
A script, not a test.

    python benchmarks/pipeline_bench.py [--images N] [--device cpu|cuda] [--batch-size 16]
        [--methods gradcam,gradcampp,integrated_gradients] [--baselines LIST] [--metrics LIST]
        [--ig-steps 50] [--ig-per-pathology N] [--prefetch-workers N] [--threads N]
        [--plain-loop] [--only-plain-loop] [--json PATH]

Data: the NIH development boxes in ../shared/data/nih_bbox_dev when present (the first N
images in key order), else a phantom data set of N images; ingested into a temporary folder.
Model: random-init DenseNet-121 (seed 0), as `cxr-audit run --random-init` (timings do not
depend on the weights).

Floor (timed here, on the same images and device): one forward per image (batches of
``--batch-size``) plus ``steps`` forward+backward path points per IG target (chunks of the
automatic IG chunk size), with the audit's own network (channels_last on a CPU since that
became its format: floors from before are not comparable). ``ratio`` = stage seconds / floor
seconds. On a CPU, ``explain+score`` includes the decode threads' work on the next batch while
this one is scored (`audit.run.images.ThreadPrefetcher`). Peak memory: the process's
max RSS (and torch.cuda.max_memory_allocated on CUDA).

``--plain-loop`` adds the reference of the CPU target: a plain loop that decodes the same PNGs
(PIL), resizes them to the model's input (PIL bilinear), scales them to torchxrayvision's range
and runs one forward per batch of ``--batch-size`` of a stock network (torchxrayvision's
contiguous layout). Where the audit's model runs in another memory format (channels_last on a
CPU, `audit.model.MEMORY_FORMATS`), the loop runs a second time with that network: the first is
the peer a plain user would write, the second the same loop at the audit's own forward speed.
``--only-plain-loop`` runs only those.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from audit.config import AuditSettings  # noqa: E402
from audit.data.manifest import ingest, read_manifest, read_sidecar  # noqa: E402
from audit.model import load_model, memory_format_for, memory_format_name  # noqa: E402
from audit.run import plan  # noqa: E402
from audit.run.batch import audit_batch  # noqa: E402
from audit.run.estimate import run_plan  # noqa: E402
from audit.run.images import (  # noqa: E402
    auto_workers,
    decode_threads,
    image_prefetcher,
    submit_next,
)
from audit.saliency.integrated_gradients import auto_chunk, quadrature  # noqa: E402

NIH_DEV = REPO.parent / "shared" / "data" / "nih_bbox_dev"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def dataset(n: int, work: Path) -> tuple[Path, str]:
    """Manifest CSV of N images (real NIH dev boxes when present, else phantom), and its
    source in words."""
    if (NIH_DEV / "images").is_dir():
        pngs = sorted((NIH_DEV / "images").glob("*.png"))[:n]
        folder = work / "images"
        folder.mkdir()
        for png in pngs:
            (folder / png.name).symlink_to(png)
        result = ingest(folder, bboxes_csv=NIH_DEV / "BBox_List_2017_dev.csv",
                        labels_csv=NIH_DEV / "Data_Entry_2017_dev.csv", name="bench",
                        out_dir=work / "manifests", missing_images="ignore",
                        progress=False)
        return result.manifest_csv, f"NIH dev ({len(pngs)} real images)"
    from audit.phantom.dataset import write_phantom_dataset

    ph = write_phantom_dataset(work / "phantom", n_images=n, seed=0, n_dicom=0)
    result = ingest(ph.images_dir, bboxes_csv=ph.bbox_csv, labels_csv=ph.labels_csv,
                    name="bench", out_dir=work / "manifests", progress=False)
    return result.manifest_csv, f"phantom ({n} images)"


def run_pipeline(model, manifest_csv: Path, settings: AuditSettings, out: Path
                 ) -> tuple[dict[str, float], plan.Selection, str]:
    """The library pipeline as the flow runs it (decoding the next batch ahead); returns the
    stage seconds, the selection and how the images were decoded."""
    seconds = {"plan": 0.0, "load (waited)": 0.0, "explain+score": 0.0}
    start = time.perf_counter()
    manifest = read_manifest(manifest_csv)
    images_root = Path(read_sidecar(manifest_csv)["images_dir"])
    selection = plan.select_images(manifest, settings)
    batches = plan.plan_batches(selection, settings, model.fingerprint)
    seconds["plan"] = time.perf_counter() - start
    workers = auto_workers(settings.prefetch_workers, model.device.type,
                           n_batches=len(batches))
    loader = image_prefetcher(images_root, settings.image_size, workers)
    decoding = type(loader).__name__ + (f", {workers} processes" if workers else
                                        f", {decode_threads()} threads")
    rows_of = {b.key: selection.manifest[selection.manifest["image_key"].isin(b.image_keys)]
               for b in batches}
    try:
        for b, nxt in zip(batches, [*batches[1:], None], strict=True):
            device_done = None if nxt is None else submit_next(loader, nxt.key, rows_of[nxt.key])
            tick = time.perf_counter()
            loaded = loader.take(b.key, rows_of[b.key])
            seconds["load (waited)"] += time.perf_counter() - tick
            seconds["explain+score"] += timed(lambda b=b, loaded=loaded, done=device_done:
                                              audit_batch(model, rows_of[b.key], images_root,
                                                          settings, b.costly, out / b.key,
                                                          loaded=loaded, ig_pairs=b.ig,
                                                          device_done=done), model.device)
    finally:
        loader.close()
    seconds["pipeline total"] = sum(seconds.values())
    return seconds, selection, decoding


def floor_seconds(model, manifest_csv: Path, settings: AuditSettings, n_ig: int
                  ) -> dict[str, float]:
    """One forward per image (batches of batch_size) + steps x forward+backward per IG target,
    on tensors already in memory."""
    n = read_manifest(manifest_csv)["image_key"].nunique()
    device = model.device
    g = torch.Generator().manual_seed(0)
    size = settings.image_size
    x = (torch.rand((settings.batch_size, 1, size, size), generator=g) * 2048 - 1024).to(device)
    with torch.inference_mode():
        model.logits(x)  # warm-up
    forward = 0.0
    for start in range(0, n, settings.batch_size):
        part = x[: min(settings.batch_size, n - start)]
        with torch.inference_mode():
            forward += timed(lambda part=part: model.logits(part), device)
    out = {"floor: forwards": forward}
    if n_ig:
        steps = len(quadrature(settings.ig_method, settings.ig_steps)[0])
        chunk = auto_chunk(model, x, n_ig * steps, settings.ig_internal_batch_size)
        pts = (torch.rand((chunk, 1, size, size), generator=g) * 2048 - 1024).to(device)

        def fwd_bwd() -> None:
            p = pts.clone().requires_grad_(True)
            with torch.enable_grad():
                torch.autograd.grad(model.logits(p)[:, 0].sum(), p)

        fwd_bwd()  # warm-up
        out["floor: IG fwd+bwd"] = timed(fwd_bwd, device) / chunk * steps * n_ig
    out["floor total"] = sum(out.values())
    return out


def plain_loop(manifest_csv: Path, net, device: torch.device, batch_size: int, size: int
               ) -> float:
    """Decode every PNG of the manifest (PIL), resize, scale, one forward of ``net`` (its
    ``logits``) per batch."""
    sidecar = read_sidecar(manifest_csv)
    paths = sorted(set(read_manifest(manifest_csv)["path"]))
    root = Path(sidecar["images_dir"])
    start = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        arrays = []
        for rel in paths[i: i + batch_size]:
            with Image.open(root / rel) as img:
                small = img.convert("L").resize((size, size), Image.Resampling.BILINEAR)
            arrays.append(np.asarray(small, dtype=np.float32) / 255.0 * 2048 - 1024)
        x = torch.from_numpy(np.stack(arrays))[:, None].to(device)
        with torch.inference_mode():
            net.logits(x)
    _sync(device)
    return time.perf_counter() - start


def plain_loops(model, manifest_csv: Path, batch_size: int, size: int) -> dict[str, float]:
    """The plain loop with a stock network (torchxrayvision's contiguous layout), and again with
    the audit's own network when that runs in another memory format (channels_last on a CPU)."""
    stock = copy.deepcopy(model.net).to(memory_format=torch.contiguous_format)
    cpu = _cpu_seconds()
    rows = {"plain loop (decode + 1 forward/batch)": plain_loop(
        manifest_csv, stock, model.device, batch_size, size)}
    rows["plain loop: CPU seconds (user + sys)"] = _cpu_seconds() - cpu
    fmt = memory_format_for(model.device)
    if fmt != torch.contiguous_format:
        rows[f"plain loop, {memory_format_name(fmt)} as the audit's model"] = plain_loop(
            manifest_csv, model.net, model.device, batch_size, size)
    return rows


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_memory(device: torch.device) -> str:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = f"max RSS {rss:.0f} MiB"
    if device.type == "cuda":
        text += f", CUDA max allocated {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="library pipeline benchmark")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--methods", default="gradcam,gradcampp,integrated_gradients")
    ap.add_argument("--baselines", default="random,centre_prior,average_box")
    ap.add_argument("--metrics", default="localization")
    ap.add_argument("--ig-steps", type=int, default=50)
    ap.add_argument("--ig-per-pathology", type=int, default=None)
    ap.add_argument("--costly-max-pairs", type=int, default=None)
    ap.add_argument("--prefetch-workers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--plain-loop", action="store_true", help="add the plain-loop reference")
    ap.add_argument("--only-plain-loop", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    split = [s for s in args.baselines.split(",") if s]
    settings = AuditSettings(
        random_init=True, manifest="bench", device=args.device, batch_size=args.batch_size,
        methods=[s for s in args.methods.split(",") if s], baselines=split,
        metrics=[s for s in args.metrics.split(",") if s], ig_steps=args.ig_steps,
        ig_per_pathology=args.ig_per_pathology, costly_max_pairs=args.costly_max_pairs,
        prefetch_workers=args.prefetch_workers, progress=False).validate()
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        work = Path(tmp)
        tick = time.perf_counter()
        manifest_csv, source = dataset(args.images, work)
        rows["ingest"] = time.perf_counter() - tick
        tick = time.perf_counter()
        model = load_model(random_init=True, seed=0, device=args.device)
        rows["model load"] = time.perf_counter() - tick
        device = model.device
        if not args.only_plain_loop:
            stages, selection, decoding = run_pipeline(model, manifest_csv, settings,
                                                       work / "batches")
            rows.update(stages)
            counts = run_plan(selection, settings)
            n_ig = counts.ig_pairs if "integrated_gradients" in settings.methods else 0
            rows.update(floor_seconds(model, manifest_csv, settings, n_ig))
        if args.plain_loop or args.only_plain_loop:
            rows.update(plain_loops(model, manifest_csv, args.batch_size, settings.image_size))
    floor = rows.get("floor total")
    print(f"# pipeline_bench: {source}, device {device}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}, methods {args.methods}, baselines {args.baselines or '-'}, "
          f"metrics {args.metrics}, IG steps {args.ig_steps}")
    if not args.only_plain_loop:
        print(f"# decoding: {decoding}")
        print(f"# {counts.images} images, {counts.boxes} boxes, {counts.targets} targets, "
              f"{n_ig} IG pairs, {counts.costly_pairs} costly pairs")
    print(f"{'stage':42s} {'seconds':>9s} {'ratio to floor':>15s}")
    for name, value in rows.items():
        ratio = f"{value / floor:15.2f}" if floor else f"{'':15s}"
        print(f"{name:42s} {value:9.2f} {ratio}")
    print(f"# peak memory: {peak_memory(device)}")
    if args.json:
        args.json.write_text(json.dumps({"source": source, "rows": rows,
                                         "memory": peak_memory(device)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
