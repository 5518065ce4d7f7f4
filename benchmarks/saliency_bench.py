"""Saliency engine benchmark: ours vs the peer composition (pytorch-grad-cam per class, Captum IG),
same process, same model, same inputs. A script, not a test.

    python benchmarks/saliency_bench.py [--quick] [--device cpu|cuda] [--threads N]
                                        [--json PATH] [--images N] [--images-dir DIR]

Model: random-init torchxrayvision DenseNet-121 (seed 0) whose BatchNorm running statistics are
set from 8 seeded random images, so that logits are data-like (O(1-10)) rather than O(100s);
timings do not depend on the weights. Inputs: real NIH images from ../shared/data when present
(else seeded random images), 224x224, torchxrayvision range.

All times are per image and, where a row says so, for all its targets. ``ratio = peer / ours``
(> 1: ours is faster). Floor rows compare ours with plain forward(+backward) passes of the same
network (peer = the floor). Peak memory: process max RSS (and torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from audit.model import load_model  # noqa: E402
from audit.saliency import explain_all, get_method  # noqa: E402
from audit.saliency.integrated_gradients import make_baseline  # noqa: E402

NIH_14 = ["Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema",
          "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule",
          "Mass", "Hernia"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, repeats: int = 1,
           warmup: int = 0) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def calibrate_bn(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    imgs = (torch.rand((8, 1, 224, 224), generator=g) * 2048 - 1024).to(model.device)
    for mod in model.net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
    model.net.train()
    with torch.no_grad():
        model.net(imgs)
    model.net.eval()


DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "nih_bbox_dev" / "images"


def load_images(n: int, device: torch.device, folder: Path = DEFAULT_IMAGES
                ) -> tuple[torch.Tensor, str]:
    if folder.is_dir():
        import numpy as np
        from PIL import Image

        out = []
        for path in sorted(folder.glob("*.png"))[:n]:
            with Image.open(path) as im:
                px = np.asarray(im.convert("L"), dtype=np.float32)
            t = torch.from_numpy((px - px.min()) / max(px.max() - px.min(), 1e-6) * 2048 - 1024)
            out.append(torch.nn.functional.interpolate(
                t[None, None], size=(224, 224), mode="bilinear", antialias=True)[0])
        if len(out) == n:
            return torch.stack(out).to(device), f"{n} NIH images ({folder})"
    g = torch.Generator().manual_seed(1)
    return (torch.rand((n, 1, 224, 224), generator=g) * 2048 - 1024).to(device), \
        f"{n} random images"


def peak_memory(device: torch.device) -> str:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    text = f"peak RSS {rss_mb:.0f} MiB"
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        text += f", torch.cuda.max_memory_allocated {peak:.0f} MiB"
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="saliency engine benchmark")
    ap.add_argument("--quick", action="store_true", help="1 image, 1 repeat, IG 4 steps in (d)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--images", type=int, default=None, help="images per batch")
    ap.add_argument("--images-dir", type=Path, default=DEFAULT_IMAGES,
                    help="PNG folder (first N sorted); seeded random images when absent")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    quick = args.quick
    n_img = args.images or (1 if quick else 4)
    reps = 1 if quick else 3
    ig_steps = 50
    ig_chunk = 25
    d_steps = 4 if quick else 50
    # GPU: one untimed warm-up call per row (kernel selection, allocator); cheap there.
    # CPU: none for the expensive rows (no measurable first-call effect, and it would double
    # the run time).
    wu = 1 if device.type == "cuda" else 0
    started = time.perf_counter()

    from captum.attr import IntegratedGradients as CaptumIG
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = load_model(random_init=True, seed=0, device=str(device))
    calibrate_bn(model)
    x, source = load_images(n_img, device, args.images_dir)
    all14 = torch.tensor([[model.finding_index(f) for f in NIH_14]] * n_img, device=device)
    one = all14[:, 7:8]  # Effusion
    rows: list[dict] = []
    floors: dict[str, float] = {}

    def row(name, ours, peer, peer_name, target=""):
        rows.append({"name": name, "ours_s": ours, "peer_s": peer, "ratio": peer / ours,
                     "peer": peer_name, "target": target})

    # ---- (a) floors -----------------------------------------------------------------------
    def fwd():
        with torch.inference_mode():
            model.logits(x)

    target = int(one[0, 0])

    def fwd_bwd(points=x):
        xi = points.detach().requires_grad_(True)
        torch.autograd.grad(model.logits(xi)[:, target].sum(), xi)

    fwd()
    fwd_bwd()  # warm-up
    floors["forward"] = timeit(fwd, device, 3) / n_img
    floors["forward+backward"] = timeit(fwd_bwd, device, 3) / n_img

    # ---- (b) CAM --------------------------------------------------------------------------
    def ours_cam(names, targets):
        return lambda: explain_all(model, x, targets, names)

    def pgc(classes, targets):
        def run():
            for cls in classes:
                with cls(model.net, [model.net.relu5]) as cam:
                    for k in range(targets.shape[1]):
                        cam(x, [ClassifierOutputTarget(int(t)) for t in targets[:, k]])
        return run

    if not quick:
        for name, cls in (("gradcam", GradCAM), ("gradcampp", GradCAMPlusPlus)):
            ours = timeit(ours_cam([name], one), device, reps, warmup=1) / n_img
            peer = timeit(pgc([cls], one), device, reps, warmup=1) / n_img
            row(f"{name} 1 finding", ours, peer, "pytorch-grad-cam")
    ours14 = timeit(ours_cam(["gradcam", "gradcampp"], all14), device, reps, warmup=1) / n_img
    peer14 = timeit(pgc([GradCAM, GradCAMPlusPlus], all14), device, reps, wu) / n_img
    row("gradcam+gradcampp all 14 findings", ours14, peer14,
        "pytorch-grad-cam GradCAM + GradCAMPlusPlus, loop over 14 targets", ">= 20")
    row("gradcam+gradcampp all 14 findings vs 1 forward+backward", ours14,
        floors["forward+backward"], "floor: 1 forward+backward", ">= 1/1.5 = 0.667")

    # ---- (c) IG, 1 target, 50 steps --------------------------------------------------------
    rule = "riemann_trapezoid"
    ig = get_method("integrated_gradients", steps=ig_steps, method=rule, baseline="black",
                    internal_batch_size=ig_chunk)
    ours_res = {}

    def ours_ig():
        ours_res["r"] = ig.explain(model, x, one)

    base = make_baseline(x, "black")
    captum = CaptumIG(model.logits)
    captum_res = {}

    def captum_ig():
        captum_res["r"] = captum.attribute(x, baselines=base, target=one[:, 0], n_steps=ig_steps,
                                           method=rule, internal_batch_size=ig_chunk,
                                           return_convergence_delta=True)

    # The floor first, with one untimed call: it also warms the allocator for batches of
    # ig_chunk points, so that neither ours nor Captum pays that first-call cost.
    pts = x[:1].expand(ig_chunk, -1, -1, -1).contiguous()
    n_chunks = -(-ig_steps // ig_chunk)
    floor_chunk = timeit(lambda: fwd_bwd(pts), device, reps, warmup=1)
    floors["50 x forward+backward"] = floor_chunk * n_chunks
    t_ours_ig = timeit(ours_ig, device, reps, wu) / n_img
    t_captum_ig = timeit(captum_ig, device, reps, wu) / n_img
    row("integrated gradients 50 steps", t_ours_ig, t_captum_ig,
        f"Captum IntegratedGradients ({rule}, internal_batch_size {ig_chunk}, with delta)",
        "> 1")
    row("integrated gradients 50 steps vs 50 forward+backward", t_ours_ig,
        floors["50 x forward+backward"], "floor: 50 forward+backward (batches of 25)",
        ">= 1/1.15 = 0.870")

    # completeness: Captum 50-step riemann_trapezoid vs our quadratures with fewer steps
    completeness = []
    delta_f = ours_res["r"].extras["delta_f"].abs().double()

    def add_gap(label, gap, steps, seconds=None):
        completeness.append({"setting": label, "steps": steps,
                             "mean_gap": float(gap.double().mean()),
                             "mean_rel_gap": float((gap.double() / delta_f).mean()),
                             "seconds_per_image": seconds})

    add_gap("captum riemann_trapezoid", captum_res["r"][1].abs().view(-1, 1), ig_steps,
            t_captum_ig)
    add_gap("ours riemann_trapezoid", ours_res["r"].extras["completeness_gap"], ig_steps,
            t_ours_ig)
    for label, n in (("ours gausslegendre", 16),) + ((("ours gausslegendre", 8),
                                                      ("ours trapezoid", 50)) if not quick
                                                     else ()):
        meth = label.split()[-1]
        m = get_method("integrated_gradients", steps=n, method=meth, baseline="black",
                       internal_batch_size=ig_chunk)
        res = {}
        t = timeit(lambda m=m, res=res: res.update(r=m.explain(model, x, one)), device, 1,
                   wu) / n_img
        add_gap(label, res["r"].extras["completeness_gap"], n, t)

    # ---- (d) whole image, 14 findings: Grad-CAM + Grad-CAM++ + IG --------------------------
    def ours_all():
        explain_all(model, x, all14, ["gradcam", "gradcampp", "integrated_gradients"],
                    ig_steps=d_steps, ig_method=rule, ig_internal_batch_size=ig_chunk)

    def peer_all():
        pgc([GradCAM, GradCAMPlusPlus], all14)()
        for k in range(all14.shape[1]):
            captum.attribute(x, baselines=base, target=all14[:, k], n_steps=d_steps, method=rule,
                             internal_batch_size=ig_chunk, return_convergence_delta=True)

    t_ours_all = timeit(ours_all, device, 1, wu) / n_img
    t_peer_all = timeit(peer_all, device, 1, wu) / n_img
    row(f"whole image 14 findings: gradcam+gradcampp+IG {d_steps} steps", t_ours_all,
        t_peer_all, "pytorch-grad-cam loop + Captum IG per target")
    if not quick:
        def ig_mode(mode):
            m = get_method("integrated_gradients", steps=d_steps, method=rule,
                           internal_batch_size=ig_chunk, multi_target=mode)
            return lambda: m.explain(model, x, all14)

        t_loop = timeit(ig_mode("loop"), device, 1, wu) / n_img
        t_batched = timeit(ig_mode("batched"), device, 1, wu) / n_img
        row(f"IG 14 findings {d_steps} steps: loop (ours=) vs batched (peer=)", t_loop,
            t_batched, "multi_target='batched' (is_grads_batched backward)")

    # ---- report ---------------------------------------------------------------------------
    threads = torch.get_num_threads()
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})"
                                if device.type == "cuda" else f", {threads} thread(s)")
          + f"; torch {torch.__version__}; {source}; "
          f"{'quick' if quick else 'full'} mode, best of {reps}")
    print(f"floors per image: forward {floors['forward']:.4f} s, forward+backward "
          f"{floors['forward+backward']:.4f} s, 50 x forward+backward "
          f"{floors['50 x forward+backward']:.3f} s")
    print()
    w = max(len(r["name"]) for r in rows)
    print(f"{'row (per image)':<{w}}  {'ours s':>9}  {'peer s':>9}  {'peer/ours':>9}  target")
    for r in rows:
        print(f"{r['name']:<{w}}  {r['ours_s']:9.4f}  {r['peer_s']:9.4f}  {r['ratio']:9.2f}"
              f"  {r['target']}")
    print("  peers: " + "; ".join(f"[{i + 1}] {r['peer']}" for i, r in enumerate(rows)))
    print()
    print("completeness |sum(attr) - (F(x) - F(black))|, 1 target (Effusion logit), per image:")
    print(f"{'setting':<28} {'steps':>5} {'mean gap':>10} {'gap/|dF|':>9} {'s/image':>8}")
    for c in completeness:
        secs = "" if c["seconds_per_image"] is None else f"{c['seconds_per_image']:8.2f}"
        print(f"{c['setting']:<28} {c['steps']:5d} {c['mean_gap']:10.4f} "
              f"{c['mean_rel_gap']:9.5f} {secs}")
    print()
    print(peak_memory(device) + f"; total {time.perf_counter() - started:.0f} s")
    if args.json:
        payload = {"rows": rows, "floors": floors, "completeness": completeness,
                   "device": str(device), "threads": threads, "quick": quick, "inputs": source,
                   "torch": torch.__version__}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
