"""The maintainer's tools that made the shipped reference weights: training phantoms as tensors,
the feature cache, the head training and the shipped recipe (``RECIPES``, :func:`train`).

- ``honest``: trained on phantoms with the planted findings' labels plus an *evidence term* that
  penalizes positive class activation outside the finding's box (and, in later stages, a
  *location term*), so its CAM points at the lesion (a positive control for the audit).
- ``shortcut``: trained with labels only on phantoms where a corner marker accompanies every Mass
  and the Mass itself is faint: it classifies Mass well and "looks" at the marker (the failure the
  audit must reveal).
- ``random`` needs no training (:func:`audit.phantom.models.make_net`).

Inputs are ``[B, 1, 224, 224]`` in torchxrayvision's range: ``pixel / 255 * 2048 - 1024``.
Training phantoms are rendered directly at 224 with the 1024 geometry
(:mod:`audit.phantom.generate`). Only the head is trained, on cached front-end features
(:mod:`audit.phantom.frontend`).

CAM used by the training: at ``features.norm5``, ``A = relu(norm5)`` (``[B, 1024, 7, 7]``),
``cam_c = sum_k W[c, k] A_k``, signed; ``relu(cam_c) / 49`` is the audit's default Grad-CAM (the
rectified norm5 map).

Evidence term: ``lambda * mean over (image, finding) of mean_7x7(relu(cam_c) * (1 - m))`` where
``m`` is the fraction of each 32x32 cell of the 224 frame covered by the finding's box (``m = 0``
everywhere when the finding is absent). Location term: :func:`location_loss`.
"""

from __future__ import annotations

import functools
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from audit.phantom.frontend import (
    FRONTEND_CHANNELS,
    build_frontend,
    frontend_features,
    head_live,
    silence_block4_after,
)
from audit.phantom.generate import FINDINGS, PhantomConfig, generate_phantom
from audit.phantom.models import finding_indices, make_net
from audit.store.files import atomic_write_bytes, atomic_write_text

INPUT_SIZE = 224
CAM_SIZE = 7
#: Evidence-term weight by kind when :func:`train_head` is not given one.
DEFAULT_EVIDENCE_WEIGHT = {"honest": 0.5, "shortcut": 0.0}


def save_atomic(obj, path: str | Path) -> Path:
    """``torch.save`` of ``obj`` to ``path``, written atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def to_xrv_range(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W]`` -> float32 ``[N, 1, H, W]`` in [-1024, 1024].

    The scaling of ``audit.data.preprocess.to_xrv_range`` with the range (0, 255), for a batch and
    in float32 arithmetic (as the shipped weights were trained: changing the rounding would change
    the cached features, and with them the recipe's weights)."""
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


def restores_torch_settings(fn):
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
        save_atomic({"z": cache.z, "labels": cache.labels, "masks": cache.masks}, path)
    return cache


def location_loss(cam: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean over present (image, finding) of ``-log sum_cells softmax(cam) * m``: the share of
    the softmax-normalized map on the finding's box cells (``m`` = box cell coverage)."""
    present = masks.flatten(2).sum(-1) > 0  # [B, K]
    if not present.any():
        return cam.sum() * 0.0
    p = torch.softmax(cam.flatten(2), dim=-1)
    share = (p * masks.flatten(2)).sum(-1).clamp_min(1e-6)
    return -(share.log()[present]).mean()


def loss_description(evidence_weight: float, location_weight: float) -> str:
    text = "BCE-with-logits on Mass, Effusion, Pneumothorax, Nodule, Cardiomegaly"
    if evidence_weight:
        text += " + evidence_weight * mean(relu(cam) * (1 - box cell coverage))"
    if location_weight:
        text += " + location_weight * mean over present findings of -log(softmax(cam) mass on box)"
    return text


@restores_torch_settings
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
) -> dict:
    """Train the first ``live_layers`` dense layers of denseblock4 + norm5 + classifier of a
    front-end net on cached phantom features (the other block-4 layers are silenced).

    Step ``s`` uses a seeded permutation of the cache (epoch ``s // (N // B)``), so
    ``max_steps`` = the recorded ``steps`` reproduces a run. Training stops at ``max_steps`` or
    after ``minutes`` of wall time, whichever comes first. A checkpoint (``out_path + '.ckpt'``:
    model, optimizer, step, history) is written every ``checkpoint_every_s`` and at the end; with
    ``resume`` an existing checkpoint is continued. The float32 state dict goes to ``out_path``,
    the record (steps, minutes, settings, loss curve) to ``out_path + '.json'``; returns the
    record."""
    from tqdm import tqdm

    if kind not in ("honest", "shortcut"):
        raise ValueError(kind)
    if evidence_weight is None:
        evidence_weight = DEFAULT_EVIDENCE_WEIGHT[kind]
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
        "lr": lr,
        "batch_size": batch_size,
        "weight_decay": 1e-4,
        "optimizer": "AdamW",
        "threads": threads,
        "train_images": n,
        "train_set_seed": seed,
        "input_size": INPUT_SIZE,
        "shortcut_set": kind == "shortcut",
        "loss": loss_description(evidence_weight, location_weight),
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
        save_atomic(
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
        logits, cam = head_live(net, cache.z[sel], idx, live_layers, training=True)
        cls = F.binary_cross_entropy_with_logits(logits[:, idx], cache.labels[sel])
        ev = (F.relu(cam) * (1.0 - cache.masks[sel])).mean()
        loss = cls + evidence_weight * ev if evidence_weight else cls
        if location_weight:
            loss = loss + location_weight * location_loss(cam, cache.masks[sel])
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
    save_atomic(net.state_dict(), out_path)
    rec = record()
    atomic_write_text(out_path.with_name(out_path.name + ".json"), json.dumps(rec, indent=1))
    return rec


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
    save_atomic(torch.load(init, map_location="cpu", weights_only=True), out_path)
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
    atomic_write_text(out_path.with_name(out_path.name + ".json"), json.dumps(record, indent=1))
    return record
