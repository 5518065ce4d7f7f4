"""DenseNet-121 loading (torchxrayvision weight names, a local checkpoint, or random init), logits,
probabilities, the Grad-CAM target layer and a weights fingerprint.

Three sources, exactly one per call of :func:`load_model`:

* ``weights="densenet121-res224-nih"`` (any name in :data:`KNOWN_WEIGHTS`): torchxrayvision's
  pretrained weights, read from torchxrayvision's own cache
  (``~/.torchxrayvision/models_data/<file>``). The cache file is checked *before*
  torchxrayvision is called, so nothing is downloaded unless ``allow_download=True``; a missing
  file raises :class:`WeightsUnavailable`, whose message names the expected path and the
  ``--checkpoint`` alternative.
* ``checkpoint=PATH``: a state dict (bare, or under ``state_dict`` / ``model_state_dict`` /
  ``model``; ``module.`` prefixes from DataParallel are stripped; fp16/bf16 tensors are cast to
  float32), or a pickled torchxrayvision model. A dict checkpoint may carry ``pathologies`` (or
  ``labels`` / ``targets``) and ``op_threshs``.
* ``random_init=True``: torchxrayvision's own initialization under ``torch.manual_seed(seed)``
  (inside a forked RNG, so the caller's global RNG state is untouched); deterministic.

The network (``AuditModel.net``) is a torchxrayvision ``DenseNet`` whose class is switched to
:class:`HookSafeDenseNet`: same parameters, same outputs (in the same memory format: on a CPU
the audit runs it channels_last, `MEMORY_FORMATS`), but the ReLU after ``features.norm5`` is
an out-of-place module (``net.relu5``) instead of ``F.relu(..., inplace=True)``. On the stock
model the in-place ReLU overwrites the very tensor that ``features.norm5`` returned, which breaks
MONAI's backward hooks (RuntimeError: "... is a view and is being modified inplace") and silently
changes what forward hooks captured (pytorch-grad-cam stores the *rectified* values on CPU — the
hook's ``.cpu()`` is a no-op there — but the pre-ReLU values on CUDA, where ``.cpu()`` copies).

Grad-CAM target: ``target_layer_name = "features.norm5"`` denotes the norm5 feature map *as the
classifier pools it*, i.e. ``ReLU(norm5(...))`` = the output of ``net.relu5`` (``[B, 1024, 7, 7]``
at 224 px); :meth:`AuditModel.features` returns it. See ``audit/saliency/_cam.py``.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from audit.protocol import DEFAULT_TARGET_LAYER, to_model_finding
from audit.store.files import sha256_file

__all__ = ["KNOWN_WEIGHTS", "DEFAULT_TARGET_LAYER", "ModelLike", "AuditModel", "apply_fp32_policy",
           "UnknownFinding", "WeightsUnavailable", "CheckpointError", "load_model",
           "make_hook_safe", "weights_cache_path", "state_dict_fingerprint", "resolve_device"]

#: torchxrayvision DenseNet-121 weight names accepted by ``load_model(weights=...)`` (and the CLI).
KNOWN_WEIGHTS: tuple[str, ...] = (
    "densenet121-res224-all",
    "densenet121-res224-nih",
    "densenet121-res224-pc",
    "densenet121-res224-chex",
    "densenet121-res224-rsna",
    "densenet121-res224-mimic_nb",
    "densenet121-res224-mimic_ch",
)



@runtime_checkable
class ModelLike(Protocol):
    """What the saliency methods and metrics need from a model (``AuditModel`` is one; the
    tests' toy models are others): a device, and pre-sigmoid logits ``[B, P]`` of ``[B, C, H,
    W]`` images."""

    device: torch.device

    def logits(self, x: torch.Tensor) -> torch.Tensor: ...


def apply_fp32_policy() -> dict[str, bool]:
    """An instrument computes in full fp32: TF32 convolutions and matmuls change CUDA maps by
    ~1% (Grad-CAM) to ~13% (IG) against fp32. Turned off process-wide (``load_model`` calls
    this, so a notebook gets the same maps as a flow); returns the flags as recorded in run.json.
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32}


#: The memory format of the network on each device type. On a CPU, oneDNN runs DenseNet-121 in
#: channels_last much faster: 16 NIH-range images at 224 px on 2 cores, forward 0.96 vs 1.43 s,
#: forward+backward 1.93 vs 2.11 s. The numbers are rounding variants of each other: features
#: (hence Grad-CAM / Grad-CAM++ in closed form) within ~1e-6 relative; IG maps (32 steps) within
#: 2.3e-7 relative L2 on the trained phantom model (8 images, box rows identical), but ~3e-3 on
#: a random-init network, whose input gradients amplify the rounding. Each format was
#: deterministic here and independent of the thread count and of the batch composition (checked
#: on one 2-core AMD EPYC: 1 vs 2 threads, batch 5 vs 16); oneDNN's kernels depend on the CPU's
#: instruction set. CUDA keeps the contiguous layout (fp32 with TF32 off: channels_last not
#: measured on CUDA).
MEMORY_FORMATS: dict[str, torch.memory_format] = {"cpu": torch.channels_last}


def memory_format_for(device: torch.device) -> torch.memory_format:
    """The memory format `load_model` gives a network on ``device`` (`MEMORY_FORMATS`)."""
    return MEMORY_FORMATS.get(device.type, torch.contiguous_format)


def memory_format_name(fmt: torch.memory_format) -> str:
    """``"channels_last"`` for ``torch.channels_last``: the name run.json records."""
    return str(fmt).removeprefix("torch.")


class UnknownFinding(KeyError):
    """A finding name the model does not predict. ``.known`` lists the names it does."""

    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = list(known)
        super().__init__(name)

    def __str__(self) -> str:
        return (f"unknown finding {self.name!r}; this model knows: "
                + ", ".join(repr(k) for k in self.known))


class WeightsUnavailable(RuntimeError):
    """Pretrained weights are not in the local cache (and downloading was not allowed or failed)."""

    def __init__(self, weights: str, path: Path, url: str, cause: str | None = None):
        self.weights = weights
        self.path = Path(path)
        self.url = url
        msg = (
            f"weights {weights!r} are not available offline: expected the torchxrayvision cache "
            f"file {self.path} (not found). Either place the file there (e.g. `wget {url} -O "
            f"{self.path}` on a machine with internet access), or load a local file with "
            f"--checkpoint PATH (load_model(checkpoint=PATH))."
        )
        if cause:
            msg += f" Download error: {cause}"
        super().__init__(msg)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be turned into a DenseNet-121 classifier."""


# --------------------------------------------------------------------------------------------
# Hook-safe network
# --------------------------------------------------------------------------------------------

def _xrv():
    import torchxrayvision as xrv  # imported lazily: it is slow to import

    return xrv


def import_model_code() -> None:
    """Import torchxrayvision now (about 2 s on a CPU) rather than at the first model load, e.g.
    while something else is waiting."""
    _xrv()


def _hook_safe_class() -> type:
    global _HOOK_SAFE_CLASS
    if _HOOK_SAFE_CLASS is None:
        xrv = _xrv()

        class HookSafeDenseNet(xrv.models.DenseNet):
            """torchxrayvision's DenseNet with an out-of-place ReLU module (``relu5``) after norm5.

            Outputs are identical to the stock forward (same ops, same order); only the in-place
            ``F.relu`` is replaced, so hooks on ``features.norm5`` see an unmodified tensor and a
            hook on ``relu5`` sees the rectified map that is pooled.
            """

            def _resize(self, x: torch.Tensor) -> torch.Tensor:
                if hasattr(self, "input_resolution"):
                    x = xrv.utils.fix_resolution(x, self.input_resolution, self)
                return x

            def rectified_features(self, x: torch.Tensor) -> torch.Tensor:
                """``ReLU(features.norm5(...))``: the map that is pooled, ``[B, 1024, h, w]``."""
                return self.relu5(self.features(self._resize(x)))

            def features2(self, x: torch.Tensor) -> torch.Tensor:
                out = self.rectified_features(x)
                return F.adaptive_avg_pool2d(out, (1, 1)).view(out.size(0), -1)

            def logits(self, x: torch.Tensor) -> torch.Tensor:
                """Pre-sigmoid outputs ``[B, P]`` (never op-normed)."""
                return self.classifier(self.features2(x))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = self.logits(x)
                if getattr(self, "op_threshs", None) is not None:
                    out = torch.sigmoid(out)
                    out = xrv.models.op_norm(out, self.op_threshs)
                elif getattr(self, "apply_sigmoid", False):
                    out = torch.sigmoid(out)
                return out

        HookSafeDenseNet.__module__ = __name__
        HookSafeDenseNet.__qualname__ = "HookSafeDenseNet"
        _HOOK_SAFE_CLASS = HookSafeDenseNet
    return _HOOK_SAFE_CLASS


_HOOK_SAFE_CLASS: type | None = None


def __getattr__(name: str) -> Any:  # lazy module attribute: HookSafeDenseNet
    if name == "HookSafeDenseNet":
        return _hook_safe_class()
    raise AttributeError(name)


def make_hook_safe(net: nn.Module) -> nn.Module:
    """Switch a torchxrayvision ``DenseNet`` (in place) to :class:`HookSafeDenseNet`; returns it.

    Parameters and buffers are untouched (``state_dict`` keys unchanged: ``relu5`` has none).
    Idempotent. Raises ``TypeError`` for anything that is not a torchxrayvision DenseNet.
    """
    cls = _hook_safe_class()
    if isinstance(net, cls):
        return net
    xrv = _xrv()
    if not isinstance(net, xrv.models.DenseNet):
        raise TypeError(f"expected a torchxrayvision DenseNet, got {type(net).__name__}")
    net.__class__ = cls
    net.relu5 = nn.ReLU(inplace=False)
    return net


# --------------------------------------------------------------------------------------------
# Fingerprint, device
# --------------------------------------------------------------------------------------------

def state_dict_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in sorted key order: for each, the key (utf-8), the dtype name,
    the shape, then the raw bytes of the contiguous CPU tensor."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(key.encode("utf-8"))
        h.update(b"\0" + str(t.dtype).encode("ascii"))
        h.update(b"\0" + ",".join(str(int(s)) for s in t.shape).encode("ascii") + b"\0")
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda`` without a GPU raises."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' requested but torch.cuda.is_available() is False")
    return dev


# --------------------------------------------------------------------------------------------
# AuditModel
# --------------------------------------------------------------------------------------------

class AuditModel:
    """A loaded DenseNet-121 classifier (always in eval mode) and what the audit needs from it."""

    target_layer_name: str = DEFAULT_TARGET_LAYER

    def __init__(self, net: nn.Module, name: str, device: torch.device,
                 provenance: dict[str, Any] | None = None):
        self.net = make_hook_safe(net).eval()
        self.name = name
        self.device = device
        self.provenance = dict(provenance or {})

    # ---- names ----------------------------------------------------------------------------
    @property
    def pathologies(self) -> list[str]:
        """Output names, one per logit; "" for outputs these weights do not train."""
        return list(self.net.pathologies)

    def finding_index(self, name: str) -> int:
        """Output index of a finding (exact name; NIH ``Infiltrate`` is accepted for
        ``Infiltration``). Raises :class:`UnknownFinding` listing the known names."""
        names = self.pathologies
        if name and name in names:
            return names.index(name)
        alias = to_model_finding(name)
        if alias in names:
            return names.index(alias)
        raise UnknownFinding(name, [n for n in names if n])

    # ---- outputs --------------------------------------------------------------------------
    @property
    def op_threshs(self) -> torch.Tensor | None:
        return getattr(self.net, "op_threshs", None)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The rectified norm5 map that is pooled: ``[B, 1024, h, w]`` (7x7 at 224 px)."""
        return self.net.rectified_features(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid outputs ``[B, P]``: the Grad-CAM/IG target."""
        return self.net.logits(x)

    def probabilities(self, x: torch.Tensor, op_norm: bool = True) -> torch.Tensor:
        """What the model reports ``[B, P]``: ``sigmoid(logit)``, then torchxrayvision's
        operating-point normalization (``op_norm``: threshold -> 0.5, outputs without a threshold
        -> 0.5) when the weights carry ``op_threshs`` and ``op_norm`` is True."""
        return self.probabilities_from_logits(self.logits(x), op_norm)

    def probabilities_from_logits(self, logits: torch.Tensor,
                                  op_norm: bool = True) -> torch.Tensor:
        """``probabilities`` of images whose logits are already computed (no second forward)."""
        p = torch.sigmoid(logits)
        if op_norm and self.op_threshs is not None:
            p = _xrv().models.op_norm(p, self.op_threshs)
        return p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)

    # ---- identity -------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """sha256 of the state dict (see :func:`state_dict_fingerprint`); recomputed on each
        access (~0.1 s), so it follows any change of the weights."""
        return state_dict_fingerprint(self.net.state_dict())

    def copy(self) -> AuditModel:
        """Deep copy (own network, own parameters)."""
        return AuditModel(copy.deepcopy(self.net), self.name, self.device, self.provenance)

    def with_net(self, net: nn.Module) -> AuditModel:
        """The same model description around another network (e.g. a randomized deep copy).
        The network is made hook-safe in place and put in eval mode; it is not copied."""
        return AuditModel(net, self.name, self.device, self.provenance)

    def to(self, device: str | torch.device) -> AuditModel:
        """Move the network to ``device``, in that device's memory format (`memory_format_for`)."""
        self.device = resolve_device(device)
        fmt = memory_format_for(self.device)
        self.net.to(self.device, memory_format=fmt)
        self.provenance["memory_format"] = memory_format_name(fmt)
        return self

    def __repr__(self) -> str:
        return f"AuditModel(name={self.name!r}, device={str(self.device)!r})"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def weights_cache_path(weights: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where torchxrayvision keeps (or would download) the file for ``weights``."""
    xrv = _xrv()
    if weights not in KNOWN_WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; known: {', '.join(KNOWN_WEIGHTS)}")
    url = xrv.models.model_urls[weights]["weights_url"]
    folder = xrv.utils.get_cache_dir() if cache_dir is None else os.fspath(cache_dir)
    return Path(os.path.expanduser(os.path.join(folder, os.path.basename(url))))


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _load_named(weights: str, cache_dir, allow_download: bool) -> nn.Module:
    xrv = _xrv()
    path = weights_cache_path(weights, cache_dir)
    url = xrv.models.model_urls[weights]["weights_url"]
    if not path.is_file() and not allow_download:
        raise WeightsUnavailable(weights, path, url)
    try:
        with _seeded(0):
            net = xrv.models.DenseNet(weights=weights,
                                      cache_dir=None if cache_dir is None else str(cache_dir))
    except WeightsUnavailable:
        raise
    except Exception as exc:  # download (network) failure, or a corrupt cache file
        if not path.is_file():
            raise WeightsUnavailable(weights, path, url, cause=f"{type(exc).__name__}: {exc}") \
                from exc
        raise
    net.pathologies = list(net.pathologies)
    return net


def _unwrap_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key in ("pathologies", "labels", "targets"):
            if key in obj and isinstance(obj[key], (list, tuple)):
                meta["pathologies"] = list(obj[key])
                break
        if obj.get("op_threshs") is not None and not isinstance(obj["op_threshs"], dict):
            meta["op_threshs"] = torch.as_tensor(obj["op_threshs"]).float()
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                return dict(obj[key]), meta
        if "model" in obj and isinstance(obj["model"], nn.Module):
            return _unwrap_module(obj["model"], meta)
        return dict(obj), meta
    if isinstance(obj, nn.Module):
        return _unwrap_module(obj, meta)
    raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict or model")


def _unwrap_module(module: nn.Module, meta: dict[str, Any]):
    for mod in module.modules():  # torchxrayvision's patch for old pickles
        if not hasattr(mod, "_non_persistent_buffers_set"):
            mod._non_persistent_buffers_set = set()
    for attr in ("pathologies", "targets"):
        if "pathologies" not in meta and isinstance(getattr(module, attr, None), (list, tuple)):
            meta["pathologies"] = list(getattr(module, attr))
    op = getattr(module, "op_threshs", None)
    if isinstance(op, torch.Tensor) and "op_threshs" not in meta:
        meta["op_threshs"] = op.detach().float().cpu()
    return dict(module.state_dict()), meta


def _load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    xrv = _xrv()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # A pickled torchxrayvision model (what torchxrayvision itself ships) needs the full
        # unpickler; only use checkpoints you trust.
        obj = torch.load(path, map_location="cpu", weights_only=False)
    state, meta = _unwrap_state_dict(obj)
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: non-tensor entries in the state dict: {bad[:5]}")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    op = state.pop("op_threshs", None)
    if op is not None and "op_threshs" not in meta:
        meta["op_threshs"] = op.float()
    if "classifier.weight" not in state:
        raise CheckpointError(f"{path}: no 'classifier.weight' — not a torchxrayvision DenseNet "
                              f"state dict (keys start with {sorted(state)[:3]})")
    n_out = int(state["classifier.weight"].shape[0])
    pathologies = meta.get("pathologies")
    if pathologies is None:
        default = list(xrv.models.DenseNet.targets)
        if n_out != len(default):
            raise CheckpointError(f"{path}: {n_out} outputs and no 'pathologies' list in the "
                                  f"checkpoint; save {{'state_dict': ..., 'pathologies': [...]}}")
        pathologies = default
    if len(pathologies) != n_out:
        raise CheckpointError(f"{path}: {len(pathologies)} pathology names for {n_out} outputs")
    with _seeded(0):
        net = xrv.models.DenseNet(weights=None, num_classes=n_out)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: state dict does not fit DenseNet-121: {exc}") from exc
    net.pathologies = list(pathologies)
    net.targets = net.pathologies
    if meta.get("op_threshs") is not None:
        op_t = meta["op_threshs"].reshape(-1).float()
        if op_t.numel() != n_out:
            raise CheckpointError(f"{path}: {op_t.numel()} op_threshs for {n_out} outputs")
        net.op_threshs = op_t
    return net, {"file_sha256": sha256_file(path)}


def load_model(weights: str | None = None, checkpoint: Path | str | None = None,
               random_init: bool = False, seed: int = 0, device: str = "auto", *,
               cache_dir: str | os.PathLike | None = None,
               allow_download: bool = False) -> AuditModel:
    """Load a DenseNet-121 from exactly one source: ``weights`` name, ``checkpoint`` file, or
    ``random_init`` (seeded). Eval mode, hook-safe, on ``device`` (auto|cpu|cuda).

    Raises :class:`WeightsUnavailable` (cache file absent and ``allow_download`` False, or the
    download failed), :class:`CheckpointError`, ``FileNotFoundError``, ``ValueError``.
    """
    chosen = [weights is not None, checkpoint is not None, bool(random_init)]
    if sum(chosen) != 1:
        raise ValueError("give exactly one of weights=NAME, checkpoint=PATH or random_init=True")
    dev = resolve_device(device)
    precision = apply_fp32_policy()
    xrv = _xrv()
    if weights is not None:
        if weights not in KNOWN_WEIGHTS:
            raise ValueError(f"unknown weights {weights!r}; known: {', '.join(KNOWN_WEIGHTS)}")
        net = _load_named(weights, cache_dir, allow_download)
        name = weights
        prov: dict[str, Any] = {"source": "weights", "weights": weights,
                                "path": str(weights_cache_path(weights, cache_dir))}
    elif checkpoint is not None:
        net, extra = _load_checkpoint(Path(checkpoint))
        name = f"checkpoint:{Path(checkpoint).name}"
        prov = {"source": "checkpoint", "path": str(checkpoint), **extra}
    else:
        with _seeded(int(seed)):
            net = xrv.models.DenseNet(weights=None)
        net.pathologies = list(xrv.models.DenseNet.targets)
        net.targets = net.pathologies
        name = f"random-init(seed={int(seed)})"
        prov = {"source": "random-init", "seed": int(seed)}
    for p in net.parameters():
        p.requires_grad_(True)
    model = AuditModel(net.eval(), name, dev, prov).to(dev)
    model.provenance["fingerprint"] = model.fingerprint
    if dev.type == "cuda":
        model.provenance["cuda"] = {"device_name": torch.cuda.get_device_name(dev), **precision}
    return model
