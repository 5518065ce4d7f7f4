"""Reference models for the digital phantom: training, evaluation, shipped weights.

Three reference models share torchxrayvision's DenseNet-121 architecture
(``xrv.models.DenseNet(weights=None)``, 18 outputs, ``pathologies`` = xrv's default list):

- ``honest``: trained on phantoms with the planted findings' labels plus an *evidence term* that
  penalizes positive class activation outside the finding's box, so its Grad-CAM points at the
  lesion (a positive control for the audit).
- ``shortcut``: trained with labels only on phantoms where a corner marker accompanies every Mass
  and the Mass itself is faint: it classifies Mass well and "looks" at the marker (the failure the
  audit must reveal).
- ``random``: seeded random initialisation (negative control; built from its seed, never shipped).

Inputs are ``[B, 1, 224, 224]`` in torchxrayvision's range: ``pixel / 255 * 2048 - 1024``.
Training phantoms are rendered directly at 224 with the 1024 geometry (:mod:`audit.phantom`).

CAM used by the training and the evaluation: at ``features.norm5``, ``A = relu(features(x))``
(``[B, 1024, 7, 7]``), ``cam_c = sum_k W[c, k] A_k`` (Grad-CAM of the rectified norm5 up to the
positive factor 1/49). The evaluation also reports Grad-CAM at the *pre-ReLU* ``features.norm5``
(gradient ``W_c / 49`` masked by ReLU', averaged per channel), which is what the audit computes.

Evidence term: ``lambda * mean over (image, finding) of mean_7x7(relu(cam_c) * (1 - m))`` where
``m`` is the fraction of each 32x32 cell of the 224 frame covered by the finding's box (``m = 0``
everywhere when the finding is absent).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from audit.phantom import (
    FINDINGS,
    FRAME,
    PhantomConfig,
    generate_phantom,
    marker_box,
)

INPUT_SIZE = 224
CAM_SIZE = 7
KINDS = ("honest", "shortcut", "random")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST_PATH = WEIGHTS_DIR / "MANIFEST.json"
HELDOUT_SEED_OFFSET = 1_000_003  # held-out phantoms use seed + this offset (disjoint from training)
POINTING_TOLERANCE_1024 = 15.0


class WeightsMismatch(RuntimeError):
    """A shipped weights file does not match the sha256 recorded in MANIFEST.json."""


def make_net(seed: int = 0) -> torch.nn.Module:
    """torchxrayvision DenseNet-121 (18 outputs), seeded random initialisation."""
    import torchxrayvision as xrv

    torch.manual_seed(seed)
    net = xrv.models.DenseNet(weights=None)
    # weights=None leaves `pathologies` unset; the outputs follow xrv's default list.
    net.pathologies = list(xrv.datasets.default_pathologies)
    net.targets = net.pathologies
    return net


def finding_indices(net: torch.nn.Module, findings=FINDINGS) -> list[int]:
    return [list(net.pathologies).index(f) for f in findings]


def to_xrv_range(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W]`` -> float32 ``[N, 1, H, W]`` in [-1024, 1024]."""
    t = torch.from_numpy(np.ascontiguousarray(images_uint8)).float()
    return (t / 255.0 * 2048.0 - 1024.0).unsqueeze(1)


def box_cell_coverage(box, size: int = INPUT_SIZE, cells: int = CAM_SIZE) -> np.ndarray:
    """Fraction of each of the ``cells x cells`` cells of a ``size`` frame covered by ``box``."""
    x, y, w, h = box
    edges = np.arange(cells + 1) * (size / cells)
    lo, hi = edges[:-1], edges[1:]
    ox = np.clip(np.minimum(x + w, hi) - np.maximum(x, lo), 0, None) / (size / cells)
    oy = np.clip(np.minimum(y + h, hi) - np.maximum(y, lo), 0, None) / (size / cells)
    return np.outer(oy, ox)


@dataclass
class PhantomBatch:
    x: torch.Tensor  # [N, 1, 224, 224]
    labels: torch.Tensor  # [N, 5] float (FINDINGS order)
    masks: torch.Tensor  # [N, 5, 7, 7] box cell coverage (0 when absent)
    boxes: list  # per image: list of (finding, (x, y, w, h)) in the 224 frame
    marker: torch.Tensor  # [N] 0/1


def phantom_batch(
    seed: int, indices, shortcut: bool = False, size: int = INPUT_SIZE, **config
) -> PhantomBatch:
    """Render phantoms ``indices`` of set ``seed`` at ``size`` and pack them as tensors.

    Extra keyword arguments go to :class:`PhantomConfig` (e.g. ``force_marker=False``)."""
    cfg = PhantomConfig(size=size, shortcut=shortcut, **config)
    imgs, labels, masks, boxes, marker = [], [], [], [], []
    for i in indices:
        img, bx, lab = generate_phantom(seed, int(i), cfg)
        imgs.append(img)
        labels.append([lab[f] for f in FINDINGS])
        m = np.zeros((len(FINDINGS), CAM_SIZE, CAM_SIZE))
        for f, b in bx:
            m[FINDINGS.index(f)] = np.maximum(m[FINDINGS.index(f)], box_cell_coverage(b, size))
        masks.append(m)
        boxes.append(bx)
        marker.append(lab["marker"])
    return PhantomBatch(
        to_xrv_range(np.stack(imgs)),
        torch.tensor(labels, dtype=torch.float32),
        torch.from_numpy(np.stack(masks)).float(),
        boxes,
        torch.tensor(marker),
    )


def rectified_cam(net, x: torch.Tensor, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, 18], cam [B, len(idx), 7, 7]) with A = relu(features(x))."""
    a = F.relu(net.features(x))
    logits = net.classifier(a.mean(dim=(2, 3)))
    cam = torch.einsum("ck,bkhw->bchw", net.classifier.weight[idx], a)
    return logits, cam


def gradcam_from_features(net, f: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """Grad-CAM at pre-ReLU ``features.norm5`` (closed form), ``[B, K, 7, 7]``.

    ``d logit_c / d f = W_c / (h w) * 1[f > 0]``; ``alpha_ck`` = its spatial mean;
    ``cam = relu(sum_k alpha_ck f_k)``."""
    hw = f.shape[2] * f.shape[3]
    pos = (f > 0).float().mean(dim=(2, 3))  # [B, 1024]
    alpha = net.classifier.weight[idx].unsqueeze(0) * pos.unsqueeze(1) / hw  # [B, K, 1024]
    return F.relu(torch.einsum("bck,bkhw->bchw", alpha, f))


def all_cams(net, x: torch.Tensor, idx: list[int], short_frontend: bool = False):
    """(logits [B, 18], rectified CAM [B, K, 7, 7], Grad-CAM at norm5 [B, K, 7, 7]), one forward.

    ``short_frontend``: compute the denseblock4 input by :func:`frontend_features` (only valid
    for a net built by :func:`build_frontend`; for quick checks during training)."""
    if short_frontend:
        f = net.features.norm5(net.features.denseblock4(frontend_features(net, x)))
    else:
        f = net.features(x)
    a = F.relu(f)
    logits = net.classifier(a.mean(dim=(2, 3)))
    cam = torch.einsum("ck,bkhw->bchw", net.classifier.weight[idx], a)
    return logits, cam, gradcam_from_features(net, f, idx)


# ------------------------------------------------------------------ training

DEFAULT_SETTINGS = {
    "honest": {"evidence_weight": 0.5, "lr": 1e-3, "batch_size": 16, "weight_decay": 1e-4},
    "shortcut": {"evidence_weight": 0.0, "lr": 1e-3, "batch_size": 16, "weight_decay": 1e-4},
}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _restores_torch_settings(fn):
    """Run ``fn`` and restore torch's thread count and determinism flag afterwards."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(det)

    return wrapper


@_restores_torch_settings
def train_end_to_end(
    kind: str,
    out_path: str | Path,
    seed: int = 0,
    minutes: float = 45.0,
    max_steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    evidence_weight: float | None = None,
    threads: int = 2,
    checkpoint_every_s: float = 180.0,
    init_from: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Train the whole DenseNet end to end on freshly rendered phantoms (not used for the shipped
    weights: ~5-35 s per step on two shared cores; see :func:`train`). Returns the record.

    Step ``s`` uses phantoms ``s*B .. s*B+B-1`` of set ``seed`` (every image is new), so a run is
    reproduced exactly by ``max_steps`` = the recorded ``steps``. Training stops at ``max_steps``
    or after ``minutes`` of wall time, whichever comes first. A checkpoint
    (``out_path + '.ckpt'``: model, optimizer, step, history) is written every
    ``checkpoint_every_s`` and at the end; with ``resume`` an existing checkpoint is continued.
    The final float32 state dict goes to ``out_path``.
    """
    from tqdm import tqdm

    if kind not in ("honest", "shortcut"):
        raise ValueError(
            f"kind must be 'honest' or 'shortcut' (random is built from its seed): {kind}"
        )
    s = dict(DEFAULT_SETTINGS[kind])
    for k, v in (("batch_size", batch_size), ("lr", lr), ("evidence_weight", evidence_weight)):
        if v is not None:
            s[k] = v
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_path.with_name(out_path.name + ".ckpt")
    shortcut = kind == "shortcut"

    net = make_net(seed)
    if init_from is not None:
        net.load_state_dict(torch.load(init_from, map_location="cpu"))
    idx = finding_indices(net)
    opt = torch.optim.AdamW(net.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    step, elapsed_before, history = 0, 0.0, []
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, elapsed_before, history = ck["step"], ck["elapsed_s"], ck["history"]
    net.train()
    B = s["batch_size"]
    t0 = time.time()
    last_ckpt = t0

    def record() -> dict:
        return {
            "kind": kind,
            "seed": seed,
            "steps": step,
            "images_seen": step * B,
            "minutes": round((elapsed_before + time.time() - t0) / 60.0, 2),
            "settings": {
                **s,
                "optimizer": "AdamW",
                "input_size": INPUT_SIZE,
                "threads": threads,
                "shortcut_set": shortcut,
                "init_from": str(init_from) if init_from else None,
                "loss": "BCE-with-logits on Mass, Effusion, Pneumothorax, Nodule, Cardiomegaly"
                + (
                    " + evidence_weight * outside-box rectified CAM" if s["evidence_weight"] else ""
                ),
            },
            "history": history,
        }

    def save_ckpt():
        rec = record()
        _atomic_save(
            {
                "model": net.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "elapsed_s": elapsed_before + time.time() - t0,
                "history": history,
                "record": rec,
            },
            ckpt_path,
        )

    budget_s = minutes * 60.0 - elapsed_before
    bar = tqdm(
        total=max_steps, initial=step, desc=f"train {kind}", disable=not progress, mininterval=10.0
    )
    run_loss = None
    while True:
        if max_steps is not None and step >= max_steps:
            break
        if time.time() - t0 >= budget_s:
            break
        batch = phantom_batch(seed, range(step * B, step * B + B), shortcut=shortcut)
        logits, cam = rectified_cam(net, batch.x, idx)
        cls = F.binary_cross_entropy_with_logits(logits[:, idx], batch.labels)
        loss = cls
        ev = torch.zeros(())
        if s["evidence_weight"]:
            ev = (F.relu(cam) * (1.0 - batch.masks)).mean()
            loss = cls + s["evidence_weight"] * ev
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        run_loss = loss.item() if run_loss is None else 0.9 * run_loss + 0.1 * loss.item()
        if step % 10 == 0 or step == 1:
            history.append(
                {
                    "step": step,
                    "t_s": round(elapsed_before + time.time() - t0, 1),
                    "loss": round(loss.item(), 5),
                    "cls": round(cls.item(), 5),
                    "evidence": round(ev.item(), 5),
                }
            )
            print(json.dumps(history[-1]), flush=True)
        bar.update(1)
        bar.set_postfix(loss=f"{run_loss:.4f}")
        if time.time() - last_ckpt >= checkpoint_every_s:
            save_ckpt()
            last_ckpt = time.time()
    bar.close()
    save_ckpt()
    net.eval()
    _atomic_save(net.state_dict(), out_path)
    rec = record()
    out_path.with_name(out_path.name + ".json").write_text(json.dumps(rec, indent=1))
    return rec


# ------------------------------------------------------------------ fixed front end + trained head
#
# On a shared 2-core CPU, end-to-end training of DenseNet-121 at 224 costs ~5 s (idle) to ~35 s
# (loaded) per step of 16 images: too slow to reach the targets within the time box. The shipped
# models therefore use a *hand-constructed front end* and a *trained head*, both inside the
# unchanged torchxrayvision DenseNet-121:
#
# - conv0/norm0 compute FRONTEND_CHANNELS fixed feature maps of the input (intensity ramps
#   relu((mean3x3(x) - T) / D) at many levels T, dark ramps, centre-surround texture and edge
#   responses, a constant channel), relu0 + pool0 as usual;
# - every dense layer of blocks 1-3 adds zeros (conv2 weight 0) and each transition passes
#   channels 0..63 through unchanged (BN identity, 1x1 conv = identity on them, 2x2 average
#   pool), so the input of denseblock4 is exactly avg_pool_8(pool0 output) on channels 0..63;
# - denseblock4, norm5 and the classifier are trained (seeded init as in xrv).
# The CAM is computed by the usual graph (features.norm5); the front end only determines which
# local intensity statistics reach the 7x7 grid.

FRONTEND_CHANNELS = 64
_U = 2048.0 / 255.0  # one 8-bit grey level in xrv units
RAMP_STEP = 10.0 * _U
UP_LEVELS = [10.0 * i for i in range(1, 25)]  # 8-bit grey levels 10..240
DOWN_LEVELS = [20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0]


def _frontend_filters() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(conv0 weight [64,1,7,7], norm0 weight (gamma) [64], norm0 bias (beta) [64])."""
    w = torch.zeros(FRONTEND_CHANNELS, 1, 7, 7, dtype=torch.float64)
    g = torch.zeros(FRONTEND_CHANNELS, dtype=torch.float64)
    b = torch.zeros(FRONTEND_CHANNELS, dtype=torch.float64)
    m3 = torch.zeros(7, 7, dtype=torch.float64)
    m3[2:5, 2:5] = 1.0 / 9.0
    m7 = torch.full((7, 7), 1.0 / 49.0, dtype=torch.float64)
    m1 = torch.zeros(7, 7, dtype=torch.float64)
    m1[3, 3] = 1.0
    gx = torch.zeros(7, 7, dtype=torch.float64)
    gx[:, 4:] = 1.0 / 21.0
    gx[:, :3] = -1.0 / 21.0
    c = 0
    for t in UP_LEVELS:  # relu((m3 - T) / D)
        w[c, 0], g[c], b[c] = m3, 1.0 / RAMP_STEP, -(t * _U - 1024.0) / RAMP_STEP
        c += 1
    for t in DOWN_LEVELS:  # relu((T - m3) / D)
        w[c, 0], g[c], b[c] = -m3, 1.0 / RAMP_STEP, (t * _U - 1024.0) / RAMP_STEP
        c += 1
    tex = 3.0 * _U
    for k in (m3 - m7, m7 - m3, m1 - m3, m3 - m1, gx, -gx, gx.T, -gx.T):
        w[c, 0], g[c], b[c] = k, 1.0 / tex, 0.0
        c += 1
    g[c], b[c] = 1.0, 1.0  # constant 1 (conv weight 0)
    return w.float(), g.float(), b.float()


def _set_bn_identity(bn: torch.nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        bn.weight.fill_(1.0)
        bn.bias.zero_()


def build_frontend(net: torch.nn.Module) -> torch.nn.Module:
    """Set conv0 ... transition3 of ``net`` to the fixed front end (in place); returns ``net``."""
    f = net.features
    w, g, b = _frontend_filters()
    with torch.no_grad():
        f.conv0.weight.copy_(w)
        f.norm0.running_mean.zero_()
        f.norm0.running_var.fill_(1.0 - f.norm0.eps)
        f.norm0.weight.copy_(g)
        f.norm0.bias.copy_(b)
        for name in ("denseblock1", "denseblock2", "denseblock3"):
            for layer in getattr(f, name).children():
                _set_bn_identity(layer.norm1)
                _set_bn_identity(layer.norm2)
                layer.conv1.weight.zero_()
                layer.conv2.weight.zero_()
        for name in ("transition1", "transition2", "transition3"):
            t = getattr(f, name)
            _set_bn_identity(t.norm)
            t.conv.weight.zero_()
            for k in range(FRONTEND_CHANNELS):
                t.conv.weight[k, k, 0, 0] = 1.0
    return net


def frontend_features(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input of denseblock4 ``[B, 512, 7, 7]`` by the short path (equal to the full graph for a
    net built by :func:`build_frontend`; verified in tests)."""
    f = net.features
    h = f.pool0(F.relu(f.norm0(f.conv0(x))))
    h = F.avg_pool2d(h[:, :FRONTEND_CHANNELS], 8)
    return F.pad(h, (0, 0, 0, 0, 0, f.transition3.conv.out_channels - FRONTEND_CHANNELS))


def full_block4_input(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input of denseblock4 through the whole graph (conv0 ... transition3)."""
    f = net.features
    h = x
    for name, mod in f.named_children():
        if name == "denseblock4":
            return h
        h = mod(h)
    raise RuntimeError("no denseblock4")


def head_cams(net, z: torch.Tensor, idx: list[int]):
    """(logits [B, 18], rectified CAM [B, K, 7, 7]) from the denseblock4 input ``z``."""
    a = F.relu(net.features.norm5(net.features.denseblock4(z)))
    logits = net.classifier(a.mean(dim=(2, 3)))
    cam = torch.einsum("ck,bkhw->bchw", net.classifier.weight[idx], a)
    return logits, cam


@dataclass
class FeatureCache:
    z: torch.Tensor  # [N, 64, 7, 7] front-end features (channels 0..63 of the block4 input)
    labels: torch.Tensor  # [N, 5]
    masks: torch.Tensor  # [N, 5, 7, 7]


def _render_chunk(args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    seed, lo, hi, shortcut, config = args
    b = phantom_batch(seed, range(lo, hi), shortcut=shortcut, **config)
    imgs = ((b.x[:, 0] + 1024.0) / 2048.0 * 255.0).round().to(torch.uint8).numpy()
    return imgs, b.labels.numpy(), b.masks.numpy()


def build_feature_cache(
    seed: int,
    n: int,
    shortcut: bool,
    chunk: int = 250,
    path: str | Path | None = None,
    progress: bool = True,
    workers: int = 2,
    **config,
) -> FeatureCache:
    """Render ``n`` training phantoms of set ``seed`` (in ``workers`` processes; every image is a
    pure function of its index) and keep their front-end features. ``config``: extra
    :class:`PhantomConfig` fields (e.g. ``marker_probability``)."""
    from multiprocessing import get_context

    from tqdm import tqdm

    if path is not None and Path(path).exists():
        d = torch.load(path, map_location="cpu", weights_only=True)
        if d["z"].shape[0] >= n:
            return FeatureCache(d["z"][:n], d["labels"][:n], d["masks"][:n])
    net = build_frontend(make_net(seed)).eval()
    jobs = [(seed, lo, min(lo + chunk, n), shortcut, config) for lo in range(0, n, chunk)]
    zs, ys, ms = [], [], []

    def consume(chunks):
        with torch.inference_mode():
            for imgs, lab, msk in tqdm(
                chunks,
                total=len(jobs),
                desc="phantom features",
                disable=not progress,
                mininterval=10.0,
            ):
                z = frontend_features(net, to_xrv_range(imgs))[:, :FRONTEND_CHANNELS]
                zs.append(z.clone())
                ys.append(torch.from_numpy(lab))
                ms.append(torch.from_numpy(msk))

    if workers <= 1:
        consume(map(_render_chunk, jobs))
    else:
        with get_context("spawn").Pool(workers) as pool:
            consume(pool.imap(_render_chunk, jobs))
    cache = FeatureCache(torch.cat(zs), torch.cat(ys), torch.cat(ms))
    if path is not None:
        _atomic_save({"z": cache.z, "labels": cache.labels, "masks": cache.masks}, Path(path))
    return cache


def _bn_live(bn: torch.nn.BatchNorm2d, h: torch.Tensor, live: torch.Tensor, training: bool):
    """BatchNorm over the live channels only (running statistics written back in place)."""
    rm, rv = bn.running_mean[live].clone(), bn.running_var[live].clone()
    out = F.batch_norm(h, rm, rv, bn.weight[live], bn.bias[live], training, bn.momentum, bn.eps)
    if training:
        with torch.no_grad():
            bn.running_mean[live] = rm
            bn.running_var[live] = rv
    return out


def silence_block4_after(net: torch.nn.Module, live_layers: int) -> torch.nn.Module:
    """Zero the convolutions of denseblock4 layers ``live_layers..15`` (they then add zeros)."""
    with torch.no_grad():
        for k, layer in enumerate(net.features.denseblock4.children()):
            if k >= live_layers:
                layer.conv1.weight.zero_()
                layer.conv2.weight.zero_()
    return net


def head_live(
    net,
    z64: torch.Tensor,
    idx: list[int],
    live_layers: int,
    training: bool,
    with_gradcam: bool = False,
):
    """(logits [B, 18], rectified CAM [B, K, 7, 7]) computed on the live channels only.

    For a net built by :func:`build_frontend` and :func:`silence_block4_after` this equals
    :func:`head_cams` on the zero-padded input (dead channels are exactly zero before every BN
    and their BN parameters are untouched: rm 0, beta 0), at a fraction of the cost."""
    b4 = list(net.features.denseblock4.children())
    c_in = net.features.transition3.conv.out_channels
    live = list(range(FRONTEND_CHANNELS))
    feats = [z64]
    for k in range(live_layers):
        layer = b4[k]
        h = torch.cat(feats, 1)
        li = torch.tensor(live)
        h = F.relu(_bn_live(layer.norm1, h, li, training))
        h = F.conv2d(h, layer.conv1.weight[:, li])
        h = layer.conv2(F.relu(layer.norm2(h)))
        feats.append(h)
        live += list(range(c_in + 32 * k, c_in + 32 * (k + 1)))
    li = torch.tensor(live)
    f = _bn_live(net.features.norm5, torch.cat(feats, 1), li, training)
    a = F.relu(f)
    w = net.classifier.weight[:, li]
    logits = a.mean(dim=(2, 3)) @ w.T + net.classifier.bias
    cam = torch.einsum("ck,bkhw->bchw", w[idx], a)
    if not with_gradcam:
        return logits, cam
    # Grad-CAM at pre-ReLU norm5 before its final ReLU (ReLU' fraction treated as a constant)
    hw = f.shape[2] * f.shape[3]
    pos = (f > 0).float().mean(dim=(2, 3)).detach()
    alpha = w[idx].unsqueeze(0) * pos.unsqueeze(1) / hw
    return logits, cam, torch.einsum("bck,bkhw->bchw", alpha, f) * hw


def location_loss(cam: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean over present (image, finding) of ``-log sum_cells softmax(cam) * m``: the share of
    the softmax-normalized map on the finding's box cells (``m`` = box cell coverage)."""
    present = masks.flatten(2).sum(-1) > 0  # [B, K]
    if not present.any():
        return cam.sum() * 0.0
    p = torch.softmax(cam.flatten(2), dim=-1)
    share = (p * masks.flatten(2)).sum(-1).clamp_min(1e-6)
    return -(share.log()[present]).mean()


def loss_description(evidence_weight: float, location_weight: float, gradcam_weight: float) -> str:
    text = "BCE-with-logits on Mass, Effusion, Pneumothorax, Nodule, Cardiomegaly"
    if evidence_weight:
        text += " + evidence_weight * mean(relu(cam) * (1 - box cell coverage))"
    if location_weight:
        text += " + location_weight * mean over present findings of -log(softmax(cam) mass on box)"
    if gradcam_weight:
        text += " + gradcam_weight * (the same terms on Grad-CAM at pre-ReLU norm5)"
    return text


@_restores_torch_settings
def train_head(
    kind: str,
    out_path: str | Path,
    cache: FeatureCache,
    seed: int = 0,
    minutes: float = 30.0,
    max_steps: int | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    evidence_weight: float | None = None,
    threads: int = 2,
    checkpoint_every_s: float = 120.0,
    resume: bool = True,
    progress: bool = True,
    live_layers: int = 4,
    init_from: str | Path | None = None,
    location_weight: float = 0.0,
    gradcam_weight: float = 0.0,
) -> dict:
    """Train the first ``live_layers`` dense layers of denseblock4 + norm5 + classifier of a
    front-end net on cached phantom features (the other block-4 layers are silenced).

    Step ``s`` uses a seeded permutation of the cache (epoch ``s // (N // B)``), so
    ``max_steps`` = the recorded ``steps`` reproduces a run. Checkpoints as in :func:`train`."""
    from tqdm import tqdm

    if kind not in ("honest", "shortcut"):
        raise ValueError(kind)
    if evidence_weight is None:
        evidence_weight = DEFAULT_SETTINGS[kind]["evidence_weight"]
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_path.with_name(out_path.name + ".ckpt")
    net = silence_block4_after(build_frontend(make_net(seed)), live_layers)
    if init_from is not None:  # a later stage: start from an earlier stage's weights
        net.load_state_dict(torch.load(init_from, map_location="cpu", weights_only=True))
    idx = finding_indices(net)
    head = [
        *list(net.features.denseblock4.children())[:live_layers],
        net.features.norm5,
        net.classifier,
    ]
    params = [p for m in head for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    step, elapsed_before, history = 0, 0.0, []
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, elapsed_before, history = ck["step"], ck["elapsed_s"], ck["history"]
    net.eval()
    for m in head:
        m.train()
    n = cache.z.shape[0]
    per_epoch = n // batch_size
    settings = {
        "mode": "fixed front end (conv0..transition3 hand-set)"
        f" + trained denseblock4 layers 0..{live_layers - 1}/norm5/classifier",
        "live_block4_layers": live_layers,
        "init_from": Path(init_from).name if init_from else None,
        "evidence_weight": evidence_weight,
        "location_weight": location_weight,
        "gradcam_weight": gradcam_weight,
        "lr": lr,
        "batch_size": batch_size,
        "weight_decay": 1e-4,
        "optimizer": "AdamW",
        "threads": threads,
        "train_images": n,
        "train_set_seed": seed,
        "input_size": INPUT_SIZE,
        "shortcut_set": kind == "shortcut",
        "loss": loss_description(evidence_weight, location_weight, gradcam_weight),
    }
    t0 = time.time()
    last = t0

    def record():
        return {
            "kind": kind,
            "seed": seed,
            "steps": step,
            "images_seen": step * batch_size,
            "minutes": round((elapsed_before + time.time() - t0) / 60.0, 2),
            "settings": settings,
            "history": history,
        }

    def save_ckpt():
        _atomic_save(
            {
                "model": net.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "elapsed_s": elapsed_before + time.time() - t0,
                "history": history,
            },
            ckpt_path,
        )

    bar = tqdm(
        total=max_steps,
        initial=step,
        desc=f"train {kind} head",
        disable=not progress,
        mininterval=10.0,
    )
    budget = minutes * 60.0 - elapsed_before
    perm, perm_epoch = None, -1
    while (max_steps is None or step < max_steps) and time.time() - t0 < budget:
        epoch, j = divmod(step, per_epoch)
        if epoch != perm_epoch:
            gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
            perm, perm_epoch = torch.randperm(n, generator=gen), epoch
        sel = perm[j * batch_size : (j + 1) * batch_size]
        if gradcam_weight:
            logits, cam, gcp = head_live(
                net, cache.z[sel], idx, live_layers, training=True, with_gradcam=True
            )
        else:
            logits, cam = head_live(net, cache.z[sel], idx, live_layers, training=True)
        cls = F.binary_cross_entropy_with_logits(logits[:, idx], cache.labels[sel])
        ev = (F.relu(cam) * (1.0 - cache.masks[sel])).mean()
        loss = cls + evidence_weight * ev if evidence_weight else cls
        if location_weight:
            loss = loss + location_weight * location_loss(cam, cache.masks[sel])
        if gradcam_weight:  # the same two terms on Grad-CAM at pre-ReLU norm5
            m = cache.masks[sel]
            loss = loss + gradcam_weight * (
                evidence_weight * (F.relu(gcp) * (1.0 - m)).mean()
                + max(location_weight, 1.0) * location_loss(gcp, m)
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 25 == 0 or step == 1:
            history.append(
                {
                    "step": step,
                    "t_s": round(elapsed_before + time.time() - t0, 1),
                    "loss": round(loss.item(), 5),
                    "cls": round(cls.item(), 5),
                    "evidence": round(ev.item(), 5),
                }
            )
            print(json.dumps(history[-1]), flush=True)
        bar.update(1)
        if time.time() - last >= checkpoint_every_s:
            save_ckpt()
            last = time.time()
    bar.close()
    save_ckpt()
    net.eval()
    _atomic_save(net.state_dict(), out_path)
    rec = record()
    out_path.with_name(out_path.name + ".json").write_text(json.dumps(rec, indent=1))
    return rec


# ------------------------------------------------------------------ evaluation


def heldout_batch(n: int, seed: int = 0, shortcut: bool = False, **config) -> PhantomBatch:
    """``n`` held-out phantoms (set ``seed + HELDOUT_SEED_OFFSET``, disjoint from training)."""
    return phantom_batch(seed + HELDOUT_SEED_OFFSET, range(n), shortcut=shortcut, **config)


def heldout_batch_1024(n: int, seed: int = 0, shortcut: bool = False) -> PhantomBatch:
    """Held-out phantoms rendered at 1024 and resized to 224 the way the audit does it
    (bilinear with antialias), boxes scaled by 224/1024: checks that rendering the training
    images directly at 224 does not matter."""
    cfg = PhantomConfig(size=FRAME, shortcut=shortcut)
    imgs, labels, masks, boxes, marker = [], [], [], [], []
    s = INPUT_SIZE / FRAME
    for i in range(n):
        img, bx, lab = generate_phantom(seed + HELDOUT_SEED_OFFSET, i, cfg)
        t = torch.from_numpy(img).float()[None, None]
        imgs.append(
            F.interpolate(t, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True)[0, 0]
        )
        bx = [(f, (b[0] * s, b[1] * s, b[2] * s, b[3] * s)) for f, b in bx]
        labels.append([lab[f] for f in FINDINGS])
        m = np.zeros((len(FINDINGS), CAM_SIZE, CAM_SIZE))
        for f, b in bx:
            m[FINDINGS.index(f)] = np.maximum(m[FINDINGS.index(f)], box_cell_coverage(b))
        masks.append(m)
        boxes.append(bx)
        marker.append(lab["marker"])
    x = torch.stack(imgs).unsqueeze(1) / 255.0 * 2048.0 - 1024.0
    return PhantomBatch(
        x,
        torch.tensor(labels, dtype=torch.float32),
        torch.from_numpy(np.stack(masks)).float(),
        boxes,
        torch.tensor(marker),
    )


def _point_in_box(px: float, py: float, box, tol: float) -> bool:
    x, y, w, h = box
    return (x - tol <= px <= x + w + tol) and (y - tol <= py <= y + h + tol)


def _argmax_points(cam: torch.Tensor, size: int) -> np.ndarray:
    """[B, K, h, w] -> [B, K, 2] (x, y) pixel centres of the bilinear-upsampled map's argmax."""
    up = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)
    flat = up.flatten(2).argmax(dim=2)
    ys, xs = flat // size, flat % size
    return torch.stack([xs, ys], dim=-1).numpy() + 0.5


def _argmax_cells(cam: torch.Tensor) -> np.ndarray:
    """[B, K, h, w] -> [B, K, 2] (col, row) of the native-resolution map's argmax."""
    w = cam.shape[3]
    flat = cam.flatten(2).argmax(dim=2)
    return torch.stack([flat % w, flat // w], dim=-1).numpy()


def _cell_touches_box(cell, box, size: int = INPUT_SIZE, cells: int = CAM_SIZE) -> bool:
    return bool(box_cell_coverage(box, size, cells)[int(cell[1]), int(cell[0])] > 0)


@_restores_torch_settings
def evaluate(
    net: torch.nn.Module,
    batch: PhantomBatch,
    batch_size: int = 32,
    threads: int | None = None,
    short_frontend: bool = False,
) -> dict:
    """Held-out metrics of ``net`` on ``batch``.

    Returns ``{"n": N, "auroc": {finding: ...}, "pointing": {"cam": {finding: rate},
    "gradcam_norm5": {...}}, "pointing_n": {finding: n_boxes}, "marker": {...}}`` where pointing
    is the hit rate over boxes of positive images (argmax of the 224 bilinearly-upsampled map within
    15*224/1024 px of the box) and ``marker`` (only when the batch has markers) gives, over Mass
    positives with a marker, the fraction whose rectified-CAM / Grad-CAM maximum lies on the marker
    box vs on the Mass box: at 224 (``max_on_*``, same tolerance) and at the native 7x7 cells
    (``max_cell_on_*``: the argmax cell overlaps the box). The marker sits in the corner cell; the
    bilinear upsampling (align_corners=False) clamps the corner cell's maximum to the image corner,
    outside the marker box, so the 7x7 measure is the meaningful one for the marker.
    """
    from sklearn.metrics import roc_auc_score

    if threads:
        torch.set_num_threads(threads)
    net.eval()
    idx = finding_indices(net)
    logits_all, pts_cam, pts_gc, cells_cam, cells_gc = [], [], [], [], []
    with torch.inference_mode():
        for i in range(0, batch.x.shape[0], batch_size):
            xb = batch.x[i : i + batch_size]
            lg, cam, gc = all_cams(net, xb, idx, short_frontend)
            logits_all.append(lg[:, idx])
            pts_cam.append(_argmax_points(F.relu(cam), INPUT_SIZE))
            pts_gc.append(_argmax_points(gc, INPUT_SIZE))
            cells_cam.append(_argmax_cells(cam))
            cells_gc.append(_argmax_cells(gc))
    logits = torch.cat(logits_all).numpy()
    pts = {"cam": np.concatenate(pts_cam), "gradcam_norm5": np.concatenate(pts_gc)}
    cells = {"cam": np.concatenate(cells_cam), "gradcam_norm5": np.concatenate(cells_gc)}
    y = batch.labels.numpy()
    tol = POINTING_TOLERANCE_1024 * INPUT_SIZE / FRAME
    res: dict = {
        "n": int(y.shape[0]),
        "auroc": {},
        "prevalence": {},
        "pointing": {},
        "pointing_n": {},
    }
    for k, f in enumerate(FINDINGS):
        res["prevalence"][f] = int(y[:, k].sum())
        if 0 < y[:, k].sum() < len(y):
            res["auroc"][f] = round(float(roc_auc_score(y[:, k], logits[:, k])), 4)
        else:
            res["auroc"][f] = None
    for name, p in pts.items():
        res["pointing"][name] = {}
        for k, f in enumerate(FINDINGS):
            hits = [
                _point_in_box(p[i, k, 0], p[i, k, 1], b, tol)
                for i, bxs in enumerate(batch.boxes)
                for (ff, b) in bxs
                if ff == f
            ]
            res["pointing_n"][f] = len(hits)
            res["pointing"][name][f] = round(float(np.mean(hits)), 4) if hits else None
    mk = batch.marker.numpy().astype(bool)
    mass_k = FINDINGS.index("Mass")
    sel = [i for i in range(len(y)) if mk[i] and y[i, mass_k] > 0]
    if sel:
        mbox = marker_box(INPUT_SIZE)
        res["marker"] = {"n": len(sel)}
        for name, p in pts.items():
            on_marker = [_point_in_box(p[i, mass_k, 0], p[i, mass_k, 1], mbox, tol) for i in sel]
            on_mass = [
                _point_in_box(p[i, mass_k, 0], p[i, mass_k, 1], b, tol)
                for i in sel
                for (ff, b) in batch.boxes[i]
                if ff == "Mass"
            ]
            c = cells[name]
            cell_marker = [_cell_touches_box(c[i, mass_k], mbox) for i in sel]
            cell_mass = [
                _cell_touches_box(c[i, mass_k], b)
                for i in sel
                for (ff, b) in batch.boxes[i]
                if ff == "Mass"
            ]
            res["marker"][name] = {
                "max_on_marker": round(float(np.mean(on_marker)), 4),
                "max_on_mass": round(float(np.mean(on_mass)), 4),
                "max_cell_on_marker": round(float(np.mean(cell_marker)), 4),
                "max_cell_on_mass": round(float(np.mean(cell_mass)), 4),
            }
    return res


# ------------------------------------------------------------------ shipped weights


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_fp16(state_dict: dict, path: str | Path) -> str:
    """torch.save of ``{k: v.half()}`` (floating tensors only; integer buffers kept); sha256."""
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in state_dict.items()}
    _atomic_save(sd, Path(path))
    return sha256_file(path)


def read_manifest(path: str | Path = MANIFEST_PATH) -> dict:
    return json.loads(Path(path).read_text())


def load_phantom_weights(kind: str, weights_dir: str | Path | None = None) -> dict:
    """The shipped ``phantom_{kind}.pt`` as a float32 state dict, sha256-verified.

    Raises ``WeightsMismatch`` when the file's sha256 differs from MANIFEST.json, ``KeyError`` for
    a kind the manifest does not list (``random`` is never shipped: use :func:`make_net`)."""
    wdir = Path(weights_dir) if weights_dir else WEIGHTS_DIR
    manifest = read_manifest(wdir / "MANIFEST.json")
    entry = manifest["models"][kind]
    path = wdir / entry["file"]
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise WeightsMismatch(f"{path}: sha256 {digest} != manifest {entry['sha256']}")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def load_phantom_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """DenseNet with the shipped weights (``random``: seeded random init), eval mode."""
    net = make_net(seed)
    if kind != "random":
        net.load_state_dict(load_phantom_weights(kind))
    return net.eval()


def max_abs_logit_difference(net_a, net_b, x: torch.Tensor) -> float:
    """Largest |logit difference| between two nets on ``x`` (fp16 round-trip check)."""
    with torch.inference_mode():
        return float((net_a.eval()(x) - net_b.eval()(x)).abs().max())


def _full_vs_short(net, x: torch.Tensor) -> dict:
    idx = finding_indices(net)
    with torch.inference_mode():
        lf, cf, gf = all_cams(net, x, idx, short_frontend=False)
        ls, cs, gs = all_cams(net, x, idx, short_frontend=True)
    return {
        "n_images": int(x.shape[0]),
        "max_abs_logit_difference": float((lf - ls).abs().max()),
        "max_abs_cam_difference": float((cf - cs).abs().max()),
        "max_abs_gradcam_difference": float((gf - gs).abs().max()),
        "max_abs_cam": float(cf.abs().max()),
    }


def ship_weights(
    kind: str,
    trained_path: str | Path,
    record: dict,
    heldout: dict[str, PhantomBatch],
    weights_dir: str | Path | None = None,
    short_frontend: bool = True,
    n_full_check: int = 16,
) -> dict:
    """Write ``phantom_{kind}.pt`` (fp16) and its MANIFEST.json entry.

    ``heldout``: name -> batch; every metric in the entry is measured on the fp16 round trip (the
    shipped file loaded back as float32). With ``short_frontend`` the metrics use the short path
    to denseblock4 (:func:`frontend_features`), and the entry records the largest difference of
    logits and rectified CAMs between that and the full graph on ``n_full_check`` held-out images.
    Returns the entry."""
    wdir = Path(weights_dir) if weights_dir else WEIGHTS_DIR
    wdir.mkdir(parents=True, exist_ok=True)
    sd32 = torch.load(trained_path, map_location="cpu", weights_only=True)
    fname = f"phantom_{kind}.pt"
    digest = save_fp16(sd32, wdir / fname)
    net16 = make_net(0)
    net16.load_state_dict(
        {
            k: (v.float() if v.is_floating_point() else v)
            for k, v in torch.load(wdir / fname, map_location="cpu", weights_only=True).items()
        }
    )
    net32 = make_net(0)
    net32.load_state_dict(sd32)
    first = next(iter(heldout.values()))
    entry = {
        "file": fname,
        "sha256": digest,
        "bytes": (wdir / fname).stat().st_size,
        "kind": kind,
        "architecture": "torchxrayvision.models.DenseNet(weights=None), 18 outputs",
        "pathologies": list(net16.pathologies),
        "trained_outputs": list(FINDINGS),
        "input": "1x224x224, pixel/255*2048-1024",
        "seed": record["seed"],
        "steps": record["steps"],
        "images_seen": record["images_seen"],
        "minutes": record["minutes"],
        "settings": record["settings"],
        "training_curve": record["history"],
        "fp16_max_abs_logit_difference": round(
            max_abs_logit_difference(net16, net32, first.x[:16]), 5
        ),
        "full_graph_vs_short_path": _full_vs_short(net16, first.x[:n_full_check]),
        "heldout": {
            name: evaluate(net16, b, short_frontend=short_frontend) for name, b in heldout.items()
        },
        "heldout_seed": record["seed"] + HELDOUT_SEED_OFFSET,
    }
    mpath = wdir / "MANIFEST.json"
    manifest = (
        read_manifest(mpath)
        if mpath.exists()
        else {
            "description": "Reference models for the digital chest phantom (audit/phantom.py); "
            "see docs/phantom.md. Weights are fp16 state dicts; load with "
            "audit.phantom_train.load_phantom_weights(kind).",
            "models": {},
        }
    )
    manifest["models"][kind] = entry
    manifest["random"] = {
        "kind": "random",
        "note": "negative control, not shipped: audit.phantom_train.make_net(seed) "
        "(torch.manual_seed"
        "(seed) then xrv.models.DenseNet(weights=None))",
    }
    mpath.write_text(json.dumps(manifest, indent=1) + "\n")
    return entry


# ------------------------------------------------------------------ the shipped recipe

#: How the shipped weights were made (steps per stage; seed 0). ``train`` replays it.
RECIPES: dict[str, dict] = {
    "honest": {
        "train_images": 10_000,
        "stages": [
            {"max_steps": 3259, "evidence_weight": 0.5, "location_weight": 0.0, "threads": 2},
            {"max_steps": 1534, "evidence_weight": 0.5, "location_weight": 1.0, "threads": 1},
            {
                "max_steps": 493,
                "evidence_weight": 0.5,
                "location_weight": 1.0,
                "threads": 2,
                "marker_images": 3000,
            },
        ],
    },
    "shortcut": {
        "train_images": 3_000,
        "stages": [
            {"max_steps": 963, "evidence_weight": 0.0, "location_weight": 0.0, "threads": 1},
        ],
    },
}


def train(
    kind: str,
    out_path: str | Path,
    seed: int = 0,
    minutes: float | None = None,
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Build reference model ``kind`` ("honest" | "shortcut") by the shipped recipe.

    Renders the training phantoms (set ``seed``; a stage may add ``marker_images``: the first
    phantoms again with the laterality marker, independent of the findings, so the model learns
    to ignore it), caches their front-end features in
    ``work_dir`` (default: next to ``out_path``), runs the recipe's stages (each stage starts from
    the previous one's weights) and writes the float32 state dict to ``out_path`` plus
    ``out_path.json`` (the record: steps, minutes, settings and loss curve per stage).
    ``minutes`` caps each stage's wall time (``None``: run the recorded steps). With the
    recorded steps, seed 0 and the recorded thread counts this reproduces the shipped weights
    (up to the fp16 rounding of the shipped files). ``random`` needs no training: ``make_net``.
    """
    if kind not in RECIPES:
        raise ValueError(f"kind must be one of {sorted(RECIPES)}; 'random' is make_net(seed)")
    recipe = RECIPES[kind]
    out_path = Path(out_path)
    work = Path(work_dir) if work_dir else out_path.parent
    work.mkdir(parents=True, exist_ok=True)
    base = build_feature_cache(
        seed,
        recipe["train_images"],
        shortcut=kind == "shortcut",
        path=work / f"phantom_features_{kind}_{seed}.pt",
        progress=progress,
    )
    init, stages = None, []
    for k, st in enumerate(recipe["stages"]):
        cache = base
        n_marked = st.get("marker_images", 0)
        if n_marked:  # the first n_marked training phantoms again, now with the marker
            marked = build_feature_cache(
                seed,
                n_marked,
                shortcut=kind == "shortcut",
                path=work / f"phantom_features_{kind}_{seed}_marker.pt",
                progress=progress,
                marker_probability=1.0,
            )
            cache = FeatureCache(
                torch.cat([base.z, marked.z]),
                torch.cat([base.labels, marked.labels]),
                torch.cat([base.masks, marked.masks]),
            )
        stage_out = work / f"{out_path.stem}.stage{k + 1}.pt"
        rec = train_head(
            kind,
            stage_out,
            cache,
            seed=seed,
            minutes=minutes if minutes is not None else 1e9,
            max_steps=st["max_steps"],
            evidence_weight=st["evidence_weight"],
            location_weight=st["location_weight"],
            threads=st["threads"],
            init_from=init,
            progress=progress,
        )
        rec["settings"]["marker_images"] = n_marked
        stages.append(rec)
        init = stage_out
    torch.save(torch.load(init, map_location="cpu", weights_only=True), out_path)
    record = {
        "kind": kind,
        "seed": seed,
        "steps": sum(r["steps"] for r in stages),
        "images_seen": sum(r["images_seen"] for r in stages),
        "minutes": round(sum(r["minutes"] for r in stages), 2),
        "settings": {
            f"stage{k + 1}": {**r["settings"], "steps": r["steps"], "minutes": r["minutes"]}
            for k, r in enumerate(stages)
        },
        "history": {f"stage{k + 1}": r["history"] for k, r in enumerate(stages)},
    }
    out_path.with_name(out_path.name + ".json").write_text(json.dumps(record, indent=1))
    return record
