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

from audit.protocol import (
    BASELINE_NAMES,
    DEFAULT_CRITERIA,
    DEFAULT_THRESHOLD,
    METHOD_NAMES,
    METRIC_FAMILIES,
    QUADRATURE_RULES,
)


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
    methods: list[str] = field(default_factory=lambda: list(METHOD_NAMES))
    baselines: list[str] = field(default_factory=lambda: list(BASELINE_NAMES))
    metrics: list[str] = field(default_factory=lambda: list(METRIC_FAMILIES))
    threshold: float = DEFAULT_THRESHOLD
    image_size: int = 224
    batch_size: int = 16  # images per batch (task): one forward explains them all
    # sampling
    limit: int | None = None
    per_pathology: int | None = None
    seed: int = 0
    costly_per_pathology: int = 2
    # method options
    ig_steps: int = 50
    ig_method: str = "gausslegendre"
    ig_baseline: str = "black"
    ig_internal_batch_size: int | None = None  # path points per chunk; None: automatic
    ig_per_pathology: int | None = None  # IG on this many boxed pairs per finding; None: all
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
    acceptance: list[dict[str, Any]] = field(
        default_factory=lambda: [dict(c) for c in DEFAULT_CRITERIA])
    runner: str = "default"
    dask_address: str | None = None
    dask_workers: int = 2
    progress: bool = True
    prefetch_workers: int | None = None  # image decode processes; None: automatic

    def validate(self) -> AuditSettings:
        """Check every setting before any work starts; raise `ConfigError` with one line."""
        for label, given, known in (("method", self.methods, METHOD_NAMES),
                                    ("baseline", self.baselines, BASELINE_NAMES),
                                    ("metric", self.metrics, METRIC_FAMILIES)):
            unknown = [m for m in given if m not in known]
            if unknown:
                raise ConfigError(f"unknown {label}(s) {unknown}; choose from {list(known)}")
        if "localization" not in self.metrics:
            self.metrics = ["localization", *self.metrics]
        _check_numbers(self)
        models = sum([bool(self.weights), bool(self.checkpoint), bool(self.random_init)])
        if models != 1:
            raise ConfigError(
                "give exactly one of --weights NAME, --checkpoint PATH, --random-init"
            )
        if self.manifest is None and self.images is None:
            raise ConfigError("give the data: --images DIR (with --bboxes CSV) or --manifest CSV")
        if self.runner not in ("default", "dask"):
            raise ConfigError("runner must be 'default' or 'dask'")
        from audit.metrics.criteria import check_criteria

        try:
            self.acceptance = check_criteria(self.acceptance)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        return self

    def saliency_options(self) -> dict[str, Any]:
        """The options the saliency methods take from these settings (see `get_method`)."""
        return {"ig_steps": self.ig_steps, "ig_method": self.ig_method,
                "ig_baseline": self.ig_baseline,
                "ig_internal_batch_size": self.ig_internal_batch_size, "seed": self.seed}

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
            "prefetch_workers",
        }
        return {k: v for k, v in self.to_dict().items() if k not in skip}


def _check_numbers(s: AuditSettings) -> None:
    if not 0 < s.threshold < 1:
        raise ConfigError(f"threshold must lie in (0, 1), got {s.threshold}")
    if not 0 < s.fidelity_step <= 1:
        raise ConfigError(f"fidelity_step must lie in (0, 1], got {s.fidelity_step}")
    at_least = {"batch_size": 1, "image_size": 32, "ig_internal_batch_size": 1,
                "fidelity_batch_size": 1, "dask_workers": 1, "costly_per_pathology": 0,
                "shift_px": 0, "ig_steps": 2 if s.ig_method != "gausslegendre" else 1,
                "limit": 1, "per_pathology": 1, "costly_max_pairs": 0,
                "ig_per_pathology": 1, "prefetch_workers": 0}
    optional = ("limit", "per_pathology", "costly_max_pairs", "ig_internal_batch_size",
                "ig_per_pathology", "prefetch_workers")
    for name, low in at_least.items():
        value = getattr(s, name)
        if value is None and name in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if not s.noise_sigma >= 0:
        raise ConfigError(f"noise_sigma must be >= 0, got {s.noise_sigma}")
    if s.ig_method not in QUADRATURE_RULES:
        raise ConfigError(f"unknown ig_method {s.ig_method!r}; choose from "
                          f"{list(QUADRATURE_RULES)}")


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
