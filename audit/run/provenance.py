"""run.json's provenance sections, built from what produced them: the model's own provenance
(`AuditModel.provenance`), the manifest and its sidecar, the installed packages and the code."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from audit.protocol import TARGET_LAYER_TEXT
from audit.run.plan import code_fingerprint
from audit.store.files import sha256_file

PACKAGES = ("cxr-audit", "torch", "torchvision", "torchxrayvision", "numpy", "scipy", "pandas",
            "pydicom", "prefect", "scikit-image", "monai")


def model_section(model: Any) -> dict[str, Any]:
    """Name, fingerprint, source (``weights`` | ``checkpoint`` | ``random-init``), seed, whether
    the weights are a published set, the checkpoint's sha256, and the outputs."""
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
