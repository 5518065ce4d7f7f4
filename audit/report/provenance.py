"""The provenance a report may show: only whitelisted fields of ``run.json`` (nothing else from a
run's metadata is ever rendered, and no DICOM header is ever read)."""

from __future__ import annotations

import json
import math
from typing import Any

from audit.metrics.criteria import criterion_label
from audit.protocol import TARGET_LAYER_TEXT
from audit.store.files import float_or_nan

from .format import as_text, fmt, timestamp

RUN_FIELDS = ("run_id", "started_at", "finished_at", "status", "device", "git_commit", "host",
              "target_layer")
MODEL_FIELDS = ("name", "fingerprint", "checkpoint_sha256", "source", "seed", "published",
                "memory_format")
DATASET_FIELDS = ("name", "manifest_path", "manifest_sha256", "n_images", "n_boxes", "images_dir")


def sub(d: Any, key: str) -> dict:
    """``d[key]`` when it is a dict, else an empty dict."""
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, dict) else {}


def _flatten(obj: Any, prefix: str = "", limit_list: int | None = None) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if isinstance(obj, dict):
        if not obj and prefix:
            out.append((prefix, "{}"))
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k), limit_list)
    elif isinstance(obj, list):
        if limit_list is not None and len(obj) > limit_list:
            shown = json.dumps(obj[:limit_list], default=str)[:-1]
            out.append((prefix, f"{shown}, … ({len(obj)} items)]"))
        else:
            out.append((prefix, json.dumps(obj, default=str)))
    else:
        out.append((prefix, "– (not set)" if obj is None else str(obj)))
    return out


def _criterion_text(c: Any) -> str:
    """A configured criterion as text: its label (``pointing_rate >= 0.5 (95% CI)``,
    ``pointing_hit beats Centre prior (paired difference, 95% CI)``), then its other keys."""
    if isinstance(c, dict):
        head = criterion_label(c) if c.get("metric") is not None and c.get("op") is not None \
            else ""
        shown = ("metric", "op", "value", "use", "baseline")
        rest = ", ".join(f"{k}={v}" for k, v in c.items() if k not in shown or not head)
        return f"{head}; {rest}" if head and rest else (head or rest)
    return str(c)


TIME_FIELDS = ("started_at", "finished_at")


def _model_notes(model: dict) -> dict[str, str]:
    """Why a model field is empty or what a flag means, by the weights' source."""
    source = as_text(model.get("source"))
    what = {"random-init": "a randomly initialized model (negative control)",
            "checkpoint": "a local checkpoint file",
            "weights": "torchxrayvision's published weights"}.get(source, "weights of unknown "
                                                                           "source")
    published = model.get("published") is True
    return {
        "checkpoint_sha256": f"not applicable: {what}, not a checkpoint file",
        "seed": f"not applicable: {what}" if source != "random-init" else "not recorded",
        "published": (f"yes: {what}" if published else f"no: {what}, not a published weight set"),
    }


def _fields(d: dict, names: tuple[str, ...], notes: dict[str, str] | None = None
            ) -> list[tuple[str, str]]:
    """``(name, text)`` of the fields present: times to the second with their zone, a field with
    a note shown with it (``published``) or explained when empty, other empty fields left out."""
    notes = notes or {}
    out = []
    for k in names:
        if k not in d:
            continue
        text = timestamp(d.get(k)) if k in TIME_FIELDS else as_text(d.get(k))
        if k == "published":
            text = notes.get(k, text)
        elif not text:
            if k not in notes:
                continue
            text = f"– ({notes[k]})"
        out.append((k, text))
    return out


def provenance(run: dict) -> dict:
    """Only the whitelisted provenance of run.json (nothing else is ever shown)."""
    model, dataset = sub(run, "model"), sub(run, "dataset")
    timings = sub(run, "timings")
    timing_rows = [(str(k), fmt(v, 2)) for k, v in timings.items()]
    total = sum(f for f in map(float_or_nan, timings.values()) if math.isfinite(f))
    crit = run.get("acceptance_criteria") or []
    if not isinstance(crit, list):
        crit = [crit]
    return {
        "run": _fields(run, tuple(k for k in RUN_FIELDS if k != "target_layer"),
                       {"git_commit": "not recorded: the code was not run from a git checkout"}),
        "run_values": {k: timestamp(run.get(k)) if k in TIME_FIELDS else as_text(run.get(k))
                       for k in RUN_FIELDS},
        "model": _fields(model, MODEL_FIELDS, _model_notes(model)),
        "model_values": {k: as_text(model.get(k)) for k in MODEL_FIELDS},
        "dataset": _fields(dataset, DATASET_FIELDS),
        "dataset_values": {k: as_text(dataset.get(k)) for k in DATASET_FIELDS},
        "settings": _flatten(sub(run, "settings")),
        "sampled": _flatten(sub(run, "sampled"), limit_list=20),
        "versions": [(str(k), as_text(v)) for k, v in sub(run, "versions").items()],
        "files": [(str(k), as_text(v)) for k, v in sub(run, "files").items()],
        "timings": timing_rows,
        "timings_total": fmt(total, 2) if timing_rows else "",
        "criteria": [_criterion_text(c) for c in crit],
        "target_layer": as_text(run.get("target_layer")) or TARGET_LAYER_TEXT,
        "published": bool(model.get("published") is True),
        "published_text": _model_notes(model)["published"],
    }
