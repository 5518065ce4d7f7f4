"""`cxr-audit verify RUN_DIR`: does a finished run directory still hold what it recorded?

Each check gives one `Check` (OK, FAIL, WARN or SKIP, and what differs):

- ``files``: every file's sha256 against run.json's ``files`` (changed, missing, unrecorded;
  a file a command may add later, `AFTER_FINISH` such as report.pdf, is named as unsealed);
- ``boxes.csv``: the CSV is the one written from ``boxes.parquet``;
- ``per_pathology.csv`` / ``per_pathology.json`` / ``paired.csv`` / ``per_pathology_tp.csv``:
  re-derived from ``boxes`` with the installed code (`audit.run.assemble.aggregates`, verdicts
  included; `true_positive_aggregates`) and compared;
- ``probabilities``: ``boxes``, ``images`` and ``predictions`` agree on each output's
  probability and logit, and ``boxes`` belong to this run (run id, row count);
- ``registry``: the registry's row and results for the run against run.json and the tables;
- ``manifest`` / ``images``: the manifest's sha256, then every audited image's sha256 against
  the manifest and the boxes (when the files are reachable);
- ``environment.*``: the recorded environment against this one (WARN only: a difference is
  not tampering, but it is said how it differs).

A run that cannot be read at all (no run.json, not JSON, no ``files``) raises `RunUnreadable`.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from audit.store.files import sha256_file, table_bytes
from audit.store.rundir import (
    AFTER_FINISH,
    PER_PATHOLOGY_TP,
    RUN_JSON,
    RunDirectoryError,
    hashed_files,
    read_run_json,
    read_table,
    table_records,
)

OK, FAIL, WARN, SKIP = "OK", "FAIL", "WARN", "SKIP"
#: Relative tolerance of a re-derived number against the stored one (CSV keeps 17 digits).
RTOL = 1e-9
MAX_NAMED = 8  # differences named in one line; the rest are counted


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<4} {self.name}: {self.detail}"


class RunUnreadable(RuntimeError):
    """The run directory cannot be read (exit 2)."""


def exit_code(checks: list[Check]) -> int:
    """0 when no check failed, 1 otherwise (WARN and SKIP do not fail)."""
    return 1 if any(c.status == FAIL for c in checks) else 0


def _named(items: list[str]) -> str:
    more = len(items) - MAX_NAMED
    return "; ".join(items[:MAX_NAMED]) + (f"; and {more} more" if more > 0 else "")


# ---- files --------------------------------------------------------------------------------


def check_files(run_dir: Path, run: dict[str, Any]) -> Check:
    recorded: dict[str, str] = run["files"]
    present = hashed_files(run_dir)
    problems = [f"{name} changed (sha256 {digest[:12]}, recorded {recorded[name][:12]})"
                for name, digest in present.items()
                if name in recorded and digest != recorded[name]]
    problems += [f"{name} missing" for name in recorded if name not in present]
    problems += [f"{name} not recorded in {RUN_JSON}" for name in present
                 if name not in recorded and name not in AFTER_FINISH]
    if problems:
        return Check("files", FAIL, _named(problems))
    added = [name for name in present if name not in recorded and name in AFTER_FINISH]
    if added:
        return Check("files", WARN, f"{len(present) - len(added)} files match {RUN_JSON}; "
                     f"added after the run finished, not sealed: {', '.join(added)}")
    return Check("files", OK, f"{len(present)} files match {RUN_JSON}")


# ---- tables -------------------------------------------------------------------------------


def _csv_frame(data: bytes) -> pd.DataFrame:
    try:
        return pd.read_csv(io.BytesIO(data), keep_default_na=True)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float, np.number)) and isinstance(b, (int, float, np.number)) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        a, b = float(a), float(b)
        return (math.isnan(a) and math.isnan(b)) or a == b or math.isclose(a, b, rel_tol=RTOL)
    if (a is None or (isinstance(a, float) and math.isnan(a))) and \
            (b is None or (isinstance(b, float) and math.isnan(b))):
        return True
    return a == b


def frame_differences(stored: pd.DataFrame, derived: pd.DataFrame,
                      label: list[str]) -> list[str]:
    """Every cell where two tables differ, as "row label column: stored X, re-derived Y"."""
    if list(stored.columns) != list(derived.columns):
        return [f"columns differ: stored {list(stored.columns)}, re-derived "
                f"{list(derived.columns)}"]
    if len(stored) != len(derived):
        return [f"{len(stored)} rows stored, {len(derived)} re-derived"]
    out = []
    for (_, s), (_, d) in zip(stored.iterrows(), derived.iterrows(), strict=True):
        where = "/".join(str(s[c]) for c in label if c in s.index)
        out += [f"{where} {col}: stored {s[col]!r}, re-derived {d[col]!r}"
                for col in stored.columns if not _equal(s[col], d[col])]
    return out


def _table_check(name: str, problems: list[str], what: str) -> Check:
    return Check(name, FAIL, _named(problems)) if problems else Check(name, OK, what)


def check_boxes_csv(run_dir: Path) -> Check:
    boxes = read_table(run_dir, "boxes")
    csv_path = run_dir / "boxes.csv"
    if not csv_path.is_file() or boxes is None:
        return Check("boxes.csv", FAIL, "boxes.csv or boxes.parquet missing")
    expected = table_bytes(boxes, ".csv")
    if csv_path.read_bytes() == expected:
        return Check("boxes.csv", OK, f"the CSV of boxes.parquet ({len(boxes)} rows)")
    problems = frame_differences(_csv_frame(csv_path.read_bytes()), _csv_frame(expected),
                                 ["image_key", "finding", "box_index", "method"])
    return Check("boxes.csv", FAIL, "differs from boxes.parquet: "
                 + _named(problems or ["bytes differ"]))


def run_settings(run: dict[str, Any]) -> Any:
    """The run's settings as `AuditSettings` (keys this version does not know are dropped)."""
    from audit.config import AuditSettings

    known = {f.name for f in fields(AuditSettings)}
    return AuditSettings(**{k: v for k, v in (run.get("settings") or {}).items() if k in known})


def check_derived(run_dir: Path, run: dict[str, Any]) -> list[Check]:
    """per_pathology (CSV and JSON), its true-positive subset and paired, re-derived from boxes
    with the installed code."""
    from audit.run.assemble import aggregates, true_positive_aggregates

    boxes = read_table(run_dir, "boxes")
    if boxes is None:
        return [Check("per_pathology.csv", FAIL, "cannot re-derive: boxes.parquet missing")]
    settings = run_settings(run)
    per_pathology, paired = aggregates(boxes, settings)
    tables = [("per_pathology.csv", per_pathology, ["pathology", "method"]),
              ("paired.csv", paired, ["pathology", "method_a", "method_b", "metric"])]
    if (run_dir / PER_PATHOLOGY_TP).is_file() or PER_PATHOLOGY_TP in run.get("files", {}):
        tables.append((PER_PATHOLOGY_TP, true_positive_aggregates(boxes, settings),
                       ["pathology", "method"]))  # absent in runs made before it existed
    checks = []
    for name, derived, label in tables:
        path = run_dir / name
        if not path.is_file():
            checks.append(Check(name, FAIL, "missing"))
            continue
        problems = frame_differences(_csv_frame(path.read_bytes()),
                                     _csv_frame(table_bytes(derived, ".csv")), label)
        checks.append(_table_check(name, problems,
                                   f"{len(derived)} rows re-derived from boxes, equal"))
    checks.append(_check_json(run_dir / "per_pathology.json", table_records(per_pathology)))
    return checks


def _check_json(path: Path, derived: list[dict[str, Any]]) -> Check:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return Check(path.name, FAIL, f"cannot be read: {err}")
    if len(stored) != len(derived):
        return Check(path.name, FAIL, f"{len(stored)} rows stored, {len(derived)} re-derived")
    problems = [f"{s.get('pathology')}/{s.get('method')} {key}: stored {s.get(key)!r}, "
                f"re-derived {d.get(key)!r}"
                for s, d in zip(stored, derived, strict=True)
                for key in sorted(set(s) | set(d)) if not _equal(s.get(key), d.get(key))]
    return _table_check(path.name, problems, f"{len(derived)} records re-derived, equal")


def check_probabilities(run_dir: Path, run: dict[str, Any]) -> Check:
    """boxes, images and predictions agree on probability and logit; boxes are this run's."""
    boxes, images = read_table(run_dir, "boxes"), read_table(run_dir, "images")
    predictions = read_table(run_dir, "predictions")
    if boxes is None or images is None or predictions is None:
        return Check("probabilities", FAIL, "boxes, images or predictions missing")
    problems = []
    if len(boxes) != int(run.get("n_box_rows", len(boxes))):
        problems.append(f"{len(boxes)} box rows, {RUN_JSON} says {run.get('n_box_rows')}")
    if len(boxes) and set(boxes["run_id"]) != {run["run_id"]}:
        problems.append(f"boxes name run ids {sorted(set(boxes['run_id']))}")
    pairs = (
        (boxes.rename(columns={"model_finding": "f"}), images.rename(columns={"finding": "f"}),
         ["image_key", "f", "method"], "boxes vs images"),
        (images.rename(columns={"finding": "f"}), predictions.rename(columns={"finding": "f"}),
         ["image_key", "f"], "images vs predictions"),
    )
    for left, right, keys, label in pairs:
        if not len(left) or not len(right):
            continue
        merged = left[keys + ["probability", "logit"]].merge(
            right[keys + ["probability", "logit"]].drop_duplicates(keys), on=keys,
            how="left", suffixes=("", "_other"))
        for col in ("probability", "logit"):
            bad = merged[~np.isclose(merged[col], merged[f"{col}_other"], rtol=RTOL, atol=0)]
            problems += [f"{label} {'/'.join(map(str, r[keys]))} {col}: {r[col]!r} vs "
                         f"{r[f'{col}_other']!r}" for _, r in bad.iterrows()]
    return _table_check("probabilities", problems,
                        "boxes, images and predictions agree on every output")


# ---- registry -----------------------------------------------------------------------------


def registry_for(run: dict[str, Any], explicit: str | None) -> str | None:
    """The registry to check against: ``explicit``, else $CXR_AUDIT_REGISTRY, else the run's
    own ``settings.registry``; None when none is named. A SQLite file that does not exist is
    not created (None)."""
    from audit.store.registry import REGISTRY_ENV

    url = explicit or os.environ.get(REGISTRY_ENV) or (run.get("settings") or {}).get("registry")
    if not url:
        return None
    if "://" not in url:
        return f"sqlite:///{Path(url).resolve()}" if Path(url).is_file() else None
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        return None
    return url


def check_registry(run_dir: Path, run: dict[str, Any], explicit: str | None) -> Check:
    from audit.store.registry import Registry, result_rows, run_row

    url = registry_for(run, explicit)
    if url is None:
        return Check("registry", SKIP, f"no registry at {explicit}" if explicit else
                     "no registry reachable (give --registry)")
    try:
        recorded = Registry(url).recorded(run["run_id"])
    except Exception as err:  # noqa: BLE001 - any database error: not reachable
        return Check("registry", SKIP, f"registry {url} not reachable: {err}")
    if recorded is None:
        return Check("registry", FAIL, f"run {run['run_id']} is not recorded in {url}")
    row, results = recorded
    expected = run_row(run_dir)
    problems = [f"{key}: registry {row.get(key)!r}, run.json {value!r}"
                for key, value in expected.items()
                if key != "run_dir" and not _same_cell(row.get(key), value)]
    want = result_rows(run["run_id"], read_table(run_dir, "per_pathology"))
    problems += _result_differences(results, want)
    if problems:
        return Check("registry", FAIL, _named(problems))
    moved = "" if row.get("run_dir") == expected["run_dir"] else \
        f" (recorded at {row.get('run_dir')})"
    return Check("registry", OK, f"row and {len(results)} results match ({url}){moved}")


def _same_cell(a: Any, b: Any) -> bool:
    if hasattr(a, "isoformat") and hasattr(b, "isoformat"):  # SQLite drops the UTC offset
        return a.replace(tzinfo=None) == b.replace(tzinfo=None)
    return _equal(a, b)


def _result_differences(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> list[str]:
    key = lambda r: (str(r["pathology"]), str(r["method"]))  # noqa: E731
    got_by, want_by = {key(r): r for r in got}, {key(r): r for r in want}
    out = [f"registry lacks {'/'.join(k)}" for k in want_by if k not in got_by]
    out += [f"registry has {'/'.join(k)} the table lacks" for k in got_by if k not in want_by]
    for k in want_by.keys() & got_by.keys():
        out += [f"{'/'.join(k)} {col}: registry {got_by[k].get(col)!r}, per_pathology "
                f"{value!r}" for col, value in want_by[k].items()
                if not _same_cell(got_by[k].get(col), value)]
    return sorted(out)


# ---- manifest and images ------------------------------------------------------------------


def check_images(run_dir: Path, run: dict[str, Any], images_dir: Path | None) -> list[Check]:
    """The manifest's sha256, then each audited image's bytes against manifest and boxes."""
    from audit.data.manifest import read_manifest

    dataset = run.get("dataset") or {}
    manifest = Path(str(dataset.get("manifest_path", "")))
    if not manifest.is_file():
        return [Check("manifest", SKIP, f"manifest {manifest} not reachable")]
    digest = sha256_file(manifest)
    if digest != dataset.get("manifest_sha256"):
        return [Check("manifest", FAIL, f"{manifest} changed (sha256 {digest[:12]}, recorded "
                      f"{str(dataset.get('manifest_sha256'))[:12]})")]
    checks = [Check("manifest", OK, f"{manifest} sha256 matches")]
    root = Path(images_dir or dataset.get("images_dir") or "")
    predictions = read_table(run_dir, "predictions")
    audited = set(predictions["image_key"]) if predictions is not None and len(predictions) \
        else set()
    rows = read_manifest(manifest).drop_duplicates("image_key").set_index("image_key")
    boxes = read_table(run_dir, "boxes")
    box_sha = dict(zip(boxes["image_key"], boxes["sha256"], strict=True)) \
        if boxes is not None and len(boxes) else {}
    problems, unreachable = [], []
    for key in sorted(audited):
        if key not in rows.index:
            problems.append(f"{key} is not in the manifest")
            continue
        path = root / str(rows.loc[key, "path"])
        if not path.is_file():
            unreachable.append(key)
            continue
        now = sha256_file(path)
        for source, want in (("manifest", rows.loc[key, "sha256"]), ("boxes", box_sha.get(key))):
            if want is not None and now != want:
                problems.append(f"{key} changed ({path}: sha256 {now[:12]}, {source} "
                                f"{str(want)[:12]})")
    if problems:
        checks.append(Check("images", FAIL, _named(problems)))
    elif unreachable and len(unreachable) == len(audited):
        checks.append(Check("images", SKIP, f"images not reachable under {root}"))
    else:
        note = f"; {len(unreachable)} not reachable: {_named(unreachable)}" if unreachable else ""
        status = WARN if unreachable else OK
        checks.append(Check("images", status, f"{len(audited) - len(unreachable)} audited "
                            f"images match manifest and boxes{note}"))
    return checks


# ---- environment --------------------------------------------------------------------------


def check_environment(run: dict[str, Any]) -> list[Check]:
    """The recorded environment against this one, with the fp32 policy every model load applies
    (`audit.model.apply_fp32_policy`: TF32 off), so that only what a user controls differs."""
    from audit.model import apply_fp32_policy
    from audit.run.plan import code_fingerprint
    from audit.run.provenance import environment_differences, environment_section

    checks = []
    code = run.get("code_sha256")
    checks.append(Check("environment.code", OK, "the installed code is the run's")
                  if code == code_fingerprint() else
                  Check("environment.code", WARN, f"the installed code differs from the run's "
                        f"(code_sha256 {str(code)[:12]} at git {run.get('git_commit')})"))
    recorded = run.get("environment")
    if not recorded:
        return checks + [Check("environment", WARN, f"{RUN_JSON} holds no environment record")]
    apply_fp32_policy()
    current = environment_section(run_settings(run))
    for section, diffs in environment_differences(recorded, current).items():
        name = f"environment.{section}"
        checks.append(Check(name, WARN, "differs: " + _named(diffs)) if diffs
                      else Check(name, OK, "same as the run's"))
    return checks


# ---- all ----------------------------------------------------------------------------------


def read_for_verify(run_dir: Path) -> dict[str, Any]:
    """run.json, or `RunUnreadable` saying why not."""
    try:
        run = read_run_json(run_dir)
    except (RunDirectoryError, OSError, ValueError) as err:
        raise RunUnreadable(f"cannot read {Path(run_dir) / RUN_JSON}: {err}") from err
    if not isinstance(run.get("files"), dict) or "run_id" not in run:
        raise RunUnreadable(f"{Path(run_dir) / RUN_JSON} records no run id or no files")
    return run


def verify_run(run_dir: Path, registry: str | None = None,
               images_dir: Path | None = None) -> list[Check]:
    """Every check of a run directory, in order (module docstring)."""
    run_dir = Path(run_dir)
    run = read_for_verify(run_dir)
    checks = [check_files(run_dir, run)]
    for name, check in (("boxes.csv", lambda: [check_boxes_csv(run_dir)]),
                        ("per_pathology.csv", lambda: check_derived(run_dir, run)),
                        ("probabilities", lambda: [check_probabilities(run_dir, run)])):
        try:
            checks += check()
        except Exception as err:  # noqa: BLE001 - a table that cannot be read is a failure
            checks.append(Check(name, FAIL, f"cannot be checked: {type(err).__name__}: {err}"))
    checks.append(check_registry(run_dir, run, registry))
    for name, check in (("images", lambda: check_images(run_dir, run, images_dir)),
                        ("environment", lambda: check_environment(run))):
        try:
            checks += check()
        except Exception as err:  # noqa: BLE001 - e.g. a manifest that cannot be parsed
            checks.append(Check(name, FAIL, f"cannot be checked: {type(err).__name__}: {err}"))
    return checks
