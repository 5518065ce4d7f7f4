"""The phantom's reference models as the demo and the audit use them at runtime.

Three reference models share torchxrayvision's DenseNet-121 architecture (18 outputs,
``pathologies`` = xrv's default list; only Mass, Effusion, Pneumothorax, Nodule and Cardiomegaly
are trained):

- ``honest`` and ``shortcut``: shipped as fp16 state dicts in ``audit/weights/`` (package data),
  each verified against the sha256 that ``audit/weights/MANIFEST.json`` records;
- ``random``: the audit's own seeded random initialisation (``audit.model.load_model(
  random_init=True, seed=...)``), never shipped.

How the shipped weights were made, and the tools to remake and evaluate them, live in
:mod:`audit.phantom.training` and :mod:`audit.phantom.evaluation`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from audit.model import load_model
from audit.phantom.generate import FINDINGS
from audit.store.files import sha256_file

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
MANIFEST_PATH = WEIGHTS_DIR / "MANIFEST.json"


class WeightsMismatch(RuntimeError):
    """A shipped weights file does not match the sha256 recorded in MANIFEST.json."""


def make_net(seed: int = 0) -> torch.nn.Module:
    """torchxrayvision DenseNet-121 (18 outputs, xrv's default pathologies), seeded random
    initialisation, on the CPU, in eval mode: the network of the audit's random-init model
    (``load_model(random_init=True, seed=seed)``), so the phantom's ``random`` control and the
    demo's random model are the same network. The caller's global RNG state is left untouched.
    In torchxrayvision's contiguous layout (not the CPU audit's channels_last,
    `audit.model.MEMORY_FORMATS`), the one the shipped weights were trained and evaluated in, so
    `audit.phantom.training.train` still replays them."""
    net = load_model(random_init=True, seed=seed, device="cpu").net
    return net.to(memory_format=torch.contiguous_format)


def finding_indices(net: torch.nn.Module, findings=FINDINGS) -> list[int]:
    """Output index of each planted finding."""
    return [list(net.pathologies).index(f) for f in findings]


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
