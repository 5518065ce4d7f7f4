"""run.json's provenance sections, built from what produced them: the model's own provenance
(`AuditModel.provenance`), the manifest and its sidecar, the installed packages and the code,
and the environment the numbers were computed in (`environment_section`, which
`audit.store.verify` compares with the environment it runs in)."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from audit.protocol import TARGET_LAYER_TEXT
from audit.run.plan import code_fingerprint
from audit.store.files import sha256_file

PACKAGES = ("cxr-audit", "torch", "torchvision", "torchxrayvision", "numpy", "scipy", "pandas",
            "pydicom", "prefect", "scikit-image", "monai")


def model_section(model: Any) -> dict[str, Any]:
    """Name, fingerprint, source (``weights`` | ``checkpoint`` | ``random-init``), seed, whether
    the weights are a published set, the checkpoint's sha256, the outputs, and the memory format
    the network ran in (`audit.model.MEMORY_FORMATS`: its rounding is part of the numbers)."""
    prov = model.provenance
    source = prov.get("source", "")
    return {
        "name": model.name,
        "fingerprint": model.fingerprint,
        "source": source,
        "weights": prov.get("weights"),
        "seed": prov.get("seed"),
        "published": source == "weights",
        "checkpoint_sha256": prov.get("file_sha256") if source == "checkpoint" else None,
        "pathologies": [p for p in model.pathologies if p],
        "memory_format": prov.get("memory_format"),
    }


def dataset_section(manifest_csv: Path, sidecar: dict[str, Any],
                    selected: pd.DataFrame) -> dict[str, Any]:
    """The manifest (path, sha256, name, image folder) and what the run selected from it."""
    return {
        "name": sidecar.get("name", Path(manifest_csv).stem),
        "manifest_path": str(manifest_csv),
        "manifest_sha256": sha256_file(manifest_csv),
        "images_dir": sidecar.get("images_dir"),
        "n_images": int(selected["image_key"].nunique()),
        "n_boxes": int(selected["box_x"].notna().sum()),
    }


def code_section() -> dict[str, Any]:
    """Installed versions of the packages that shape the numbers, the git commit when run from a
    checkout, and the fingerprint of the package's code (the batch keys' code part)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {"versions": versions, "git_commit": git_commit(),
            "code_sha256": code_fingerprint(), "target_layer": TARGET_LAYER_TEXT}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# ---- the environment -------------------------------------------------------------------------


def distributions() -> dict[str, str]:
    """Every installed distribution (``importlib.metadata``) by its lower-case name: version;
    read once per process (~1 s for 400 distributions), a new dict each call."""
    return dict(_installed_distributions())


@functools.lru_cache(maxsize=1)
def _installed_distributions() -> tuple[tuple[str, str], ...]:
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(name.lower().replace("_", "-"), dist.version)
    return tuple(sorted(found.items()))


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "cpu model"):
                return value.strip()
    return platform.processor() or None


def nvidia_driver() -> tuple[str | None, str]:
    """(the NVIDIA driver version, how it was found or why it is unknown)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, "nvidia-smi not found"
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"nvidia-smi failed: {err}"
    version = out.stdout.strip().splitlines()[0].strip() if out.stdout.strip() else None
    return version, "nvidia-smi" if version else f"nvidia-smi gave nothing ({out.returncode})"


def gpu_section() -> dict[str, Any]:
    """GPU name, driver, CUDA runtime and cuDNN versions; every field null with ``reason`` when
    torch sees no CUDA device. ``torch_cuda_build`` is the CUDA the torch wheel was built for
    (present even on a CPU-only machine)."""
    build = torch.version.cuda
    if not torch.cuda.is_available():
        return {"available": False, "name": None, "count": 0, "driver": None,
                "cuda_runtime": None, "cudnn": None, "torch_cuda_build": build,
                "reason": "torch.cuda.is_available() is False"
                          + ("" if build else " (torch built without CUDA)")}
    driver, how = nvidia_driver()
    return {"available": True, "name": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(), "driver": driver, "driver_source": how,
            "cuda_runtime": build, "cudnn": torch.backends.cudnn.version(),
            "torch_cuda_build": build, "reason": None}


def torch_flags() -> dict[str, Any]:
    """The torch switches that change numbers: deterministic algorithms, cuDNN, TF32, float32
    matmul precision, intra- and inter-op threads."""
    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
    }


def seeds_section(settings: Any) -> dict[str, Any]:
    """Every seed of a run: ``seed`` (sampling, bootstrap, metric noise; the sample draws add
    the offsets of `audit.run.plan`), the random-init model's seed, and torch's global seed
    (the audit draws from explicit generators; recorded so that a difference shows)."""
    from audit.run.plan import CAP_SEED_OFFSET, COSTLY_SEED_OFFSET, LIMIT_SEED_OFFSET

    seed = int(settings.seed)
    return {"seed": seed, "costly_sample": seed + COSTLY_SEED_OFFSET,
            "costly_cap": seed + CAP_SEED_OFFSET, "limit_sample": seed + LIMIT_SEED_OFFSET,
            "model_seed": int(settings.model_seed) if settings.random_init else None,
            "torch_initial_seed": int(torch.initial_seed())}


def environment_section(settings: Any) -> dict[str, Any]:
    """run.json's ``environment``: every installed distribution and version, Python, the OS,
    the CPU (model, logical cores; torch's threads are under ``torch``), the GPU (or null with
    a reason), torch's numeric flags and every seed of the run."""
    return {
        "python": {"version": platform.python_version(),
                   "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "os": {"system": platform.system(), "release": platform.release(),
               "platform": platform.platform(), "machine": platform.machine()},
        "cpu": {"model": cpu_model(), "logical_cores": os.cpu_count()},
        "gpu": gpu_section(),
        "torch": {"version": torch.__version__, **torch_flags()},
        "seeds": seeds_section(settings),
        "distributions": distributions(),
    }


#: Sections of the environment record compared by `environment_differences` (seeds are the
#: run's own and Python's executable path is where it ran: neither is compared).
COMPARED_SECTIONS = ("python", "os", "cpu", "gpu", "torch", "distributions")
NOT_COMPARED = {("python", "executable"), ("gpu", "driver_source")}


def environment_differences(recorded: dict[str, Any],
                            current: dict[str, Any]) -> dict[str, list[str]]:
    """``{section: ["what: run -> now", ...]}`` for every section of two environment records
    (`environment_section`) that differs; an empty list where a section agrees. Distributions
    report versions that changed, and those only one side has ("absent")."""
    out: dict[str, list[str]] = {}
    for section in COMPARED_SECTIONS:
        old, new = recorded.get(section) or {}, current.get(section) or {}
        out[section] = [f"{key}: {old.get(key, 'absent')} -> {new.get(key, 'absent')}"
                        for key in sorted(set(old) | set(new))
                        if (section, key) not in NOT_COMPARED and old.get(key) != new.get(key)]
    return out
