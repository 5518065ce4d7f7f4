"""Run settings: one dataclass, loadable from TOML or YAML, overridable by command-line flags."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import yaml

SALIENCY_METHODS = ("gradcam", "gradcampp", "integrated_gradients")
BASELINE_METHODS = ("random", "centre_prior", "average_box")
METRIC_FAMILIES = ("localization", "repeatability", "randomization", "fidelity")

DEFAULT_CRITERIA: list[dict[str, Any]] = [
    {
        "pathology": "*",
        "method": "*",
        "metric": "pointing_rate",
        "op": ">=",
        "value": 0.5,
        "use": "estimate",
    },
]


class ConfigError(ValueError):
    """A settings file or flag has a value the audit cannot use."""


@dataclass
class AuditSettings:
    """Every setting of an audit run; all of it is recorded in `run.json`."""

    # data
    images: str | None = None
    bboxes: str | None = None
    labels: str | None = None
    manifest: str | None = None
    dataset_name: str | None = None
    # model
    weights: str | None = None
    checkpoint: str | None = None
    random_init: bool = False
    model_seed: int = 0
    device: str = "auto"
    # what to compute
    methods: list[str] = field(default_factory=lambda: list(SALIENCY_METHODS))
    baselines: list[str] = field(default_factory=lambda: list(BASELINE_METHODS))
    metrics: list[str] = field(default_factory=lambda: list(METRIC_FAMILIES))
    threshold: float = 0.15
    image_size: int = 224
    batch_size: int = 8
    # sampling
    limit: int | None = None
    per_pathology: int | None = None
    seed: int = 0
    costly_per_pathology: int = 2
    # method options
    ig_steps: int = 50
    ig_method: str = "gausslegendre"
    ig_baseline: str = "black"
    ig_internal_batch_size: int = 25
    # metric options
    noise_sigma: float = 0.02  # fraction of the [-1024, 1024] range
    shift_px: int = 2
    fidelity_step: float = 0.02
    fidelity_baseline: str = "blur"
    fidelity_batch_size: int = 26
    costly_max_pairs: int | None = None  # cap on (image, finding) pairs for the costly metrics
    randomization_blocks: list[str] | None = None
    # output
    out: str = "reports"
    save_maps: bool = False
    registry: str | None = None
    acceptance: list[dict[str, Any]] = field(default_factory=lambda: list(DEFAULT_CRITERIA))
    runner: str = "default"
    dask_address: str | None = None
    dask_workers: int = 2
    progress: bool = True

    def validate(self) -> AuditSettings:
        unknown = [m for m in self.methods if m not in SALIENCY_METHODS]
        if unknown:
            raise ConfigError(f"unknown method(s) {unknown}; choose from {list(SALIENCY_METHODS)}")
        unknown = [m for m in self.baselines if m not in BASELINE_METHODS]
        if unknown:
            raise ConfigError(
                f"unknown baseline(s) {unknown}; choose from {list(BASELINE_METHODS)}"
            )
        unknown = [m for m in self.metrics if m not in METRIC_FAMILIES]
        if unknown:
            raise ConfigError(f"unknown metric(s) {unknown}; choose from {list(METRIC_FAMILIES)}")
        if "localization" not in self.metrics:
            self.metrics = ["localization", *self.metrics]
        if not 0 < self.threshold < 1:
            raise ConfigError("threshold must lie in (0, 1)")
        models = sum([bool(self.weights), bool(self.checkpoint), bool(self.random_init)])
        if models != 1:
            raise ConfigError(
                "give exactly one of --weights NAME, --checkpoint PATH, --random-init"
            )
        if self.manifest is None and self.images is None:
            raise ConfigError("give the data: --images DIR (with --bboxes CSV) or --manifest CSV")
        if self.runner not in ("default", "dask"):
            raise ConfigError("runner must be 'default' or 'dask'")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def compute_key(self) -> dict[str, Any]:
        """The settings that change computed numbers (used in cache keys)."""
        skip = {
            "out",
            "registry",
            "runner",
            "dask_address",
            "dask_workers",
            "progress",
            "acceptance",
            "limit",
            "per_pathology",
            "dataset_name",
            "device",
        }
        return {k: v for k, v in self.to_dict().items() if k not in skip}


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML or YAML (`.yaml`/`.yml`) settings file; an `[audit]` table is optional."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_bytes()
    if path.suffix == ".toml":
        data = tomllib.loads(text.decode("utf-8"))
    elif path.suffix in (".yaml", ".yml"):
        data = yaml.safe_load(text) or {}
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ConfigError(f"config file {path}: use .toml, .yaml/.yml or .json")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of settings")
    if "audit" in data and isinstance(data["audit"], dict):
        data = {**{k: v for k, v in data.items() if k != "audit"}, **data["audit"]}
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_settings(file_values: dict[str, Any], flag_values: dict[str, Any]) -> AuditSettings:
    """Settings = defaults, overridden by the file, overridden by flags typed by the user."""
    names = {f.name for f in dataclasses.fields(AuditSettings)}
    merged: dict[str, Any] = {}
    for source in (file_values, flag_values):
        for key, value in source.items():
            if key not in names:
                raise ConfigError(f"unknown setting {key!r}")
            merged[key] = value
    return AuditSettings(**merged).validate()
