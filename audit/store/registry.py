"""The run registry: one row per finished run and one per (run, pathology, method) aggregate,
in a real database (a SQLite file by default, any SQLAlchemy URL such as PostgreSQL for a team).
Only SQL lives here; the run directory is read through `audit.store.rundir`, and the regression
check between two runs (`Registry.compare`) is `audit.store.compare`.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import (
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Engine

from audit.protocol import VERDICTS
from audit.store.compare import compare_runs, run_boxes
from audit.store.rundir import read_run_json, read_table

REGISTRY_ENV = "CXR_AUDIT_REGISTRY"
DEFAULT_REGISTRY_PATH = Path("runs") / "registry.sqlite"


_metadata = MetaData()
#: Room for every verdict (PASS, FAIL, INCONCLUSIVE); databases made with VARCHAR(8) are widened.
VERDICT_LENGTH = max(16, *map(len, VERDICTS))

runs_table = Table(
    "runs",
    _metadata,
    Column("run_id", String(64), primary_key=True),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("status", String(16)),
    Column("model_name", String(256)),
    Column("model_fingerprint", String(64)),
    Column("dataset_name", String(256)),
    Column("manifest_sha256", String(64)),
    Column("n_images", Integer),
    Column("n_boxes", Integer),
    Column("run_dir", Text),
    Column("settings_json", Text),
)

results_table = Table(
    "pathology_results",
    _metadata,
    Column("run_id", String(64), primary_key=True),
    Column("pathology", String(64), primary_key=True),
    Column("method", String(64), primary_key=True),
    Column("kind", String(16)),
    Column("n", Integer),
    Column("iou_mean", Float),
    Column("iou_mean_lo", Float),
    Column("iou_mean_hi", Float),
    Column("pointing_rate", Float),
    Column("pointing_lo", Float),
    Column("pointing_hi", Float),
    Column("verdict", String(VERDICT_LENGTH)),
)

RESULT_COLUMNS = [c.name for c in results_table.columns if c.name != "run_id"]
FLOAT_RESULT_COLUMNS = [c.name for c in results_table.columns if isinstance(c.type, Float)]


def registry_url(explicit: str | None = None) -> str:
    """The registry URL: explicit argument, else $CXR_AUDIT_REGISTRY, else runs/registry.sqlite."""
    url = explicit or os.environ.get(REGISTRY_ENV)
    if url:
        if "://" not in url:  # a plain file path
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            return f"sqlite:///{Path(url).resolve()}"
        return url
    DEFAULT_REGISTRY_PATH.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{DEFAULT_REGISTRY_PATH.resolve()}"


class Registry:
    """The database of finished runs."""

    def __init__(self, url: str | None = None) -> None:
        self.url = registry_url(url)
        self.engine: Engine = create_engine(self.url, future=True)
        _metadata.create_all(self.engine)
        _widen_verdict_column(self.engine)

    def record_run(self, run_dir: Path) -> str:
        """Insert (or replace) the rows of one finished run directory."""
        row = run_row(run_dir)
        run_id = row["run_id"]
        results = result_rows(run_id, read_table(run_dir, "per_pathology"))
        with self.engine.begin() as conn:
            conn.execute(delete(results_table).where(results_table.c.run_id == run_id))
            conn.execute(delete(runs_table).where(runs_table.c.run_id == run_id))
            conn.execute(insert(runs_table), [row])
            if results:
                conn.execute(insert(results_table), results)
        return run_id

    def recorded(self, run_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """(the run's row, its result rows) as recorded, or None when the run is not recorded;
        `run_row` and `result_rows` give what they should hold."""
        with self.engine.connect() as conn:
            row = conn.execute(select(runs_table).where(runs_table.c.run_id == run_id)
                               ).mappings().first()
            if row is None:
                return None
            results = conn.execute(select(results_table)
                                   .where(results_table.c.run_id == run_id)).mappings().all()
        return dict(row), [dict(r) for r in results]

    def history(self) -> pd.DataFrame:
        with self.engine.connect() as conn:
            rows = conn.execute(select(runs_table).order_by(runs_table.c.started_at)).mappings()
            df = pd.DataFrame([dict(r) for r in rows])
        if df.empty:
            return pd.DataFrame(columns=[c.name for c in runs_table.columns])
        return df

    def results(self, run_id: str) -> pd.DataFrame:
        with self.engine.connect() as conn:
            query = select(results_table).where(results_table.c.run_id == run_id)
            df = pd.DataFrame([dict(r) for r in conn.execute(query).mappings()])
        if df.empty:
            raise KeyError(f"run {run_id!r} is not in the registry {self.url}")
        return _numeric(df)

    def previous_run(self, run_id: str) -> str | None:
        """The latest earlier finished run of the same model fingerprint and manifest."""
        with self.engine.connect() as conn:
            this = conn.execute(
                select(runs_table).where(runs_table.c.run_id == run_id)
            ).mappings().first()
            if this is None:
                return None
            query = (
                select(runs_table.c.run_id)
                .where(runs_table.c.model_fingerprint == this["model_fingerprint"])
                .where(runs_table.c.manifest_sha256 == this["manifest_sha256"])
                .where(runs_table.c.run_id != run_id)
                .where(runs_table.c.started_at <= this["started_at"])
                .order_by(runs_table.c.started_at.desc())
            )
            found = conn.execute(query).first()
        return found[0] if found else None

    def latest_run(self, model_fingerprint: str, manifest_sha256: str) -> tuple[str, str] | None:
        """(run id, run dir) of the newest recorded run of this model on this manifest."""
        query = (
            select(runs_table.c.run_id, runs_table.c.run_dir)
            .where(runs_table.c.model_fingerprint == model_fingerprint)
            .where(runs_table.c.manifest_sha256 == manifest_sha256)
            .order_by(runs_table.c.started_at.desc())
        )
        with self.engine.connect() as conn:
            found = conn.execute(query).first()
        return (found[0], found[1]) if found else None

    def run_dir(self, run_id: str) -> str | None:
        """The run directory recorded for ``run_id`` (None when the run is not recorded)."""
        with self.engine.connect() as conn:
            found = conn.execute(select(runs_table.c.run_dir)
                                 .where(runs_table.c.run_id == run_id)).first()
        return found[0] if found else None

    def compare(self, run_a: str, run_b: str, seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
        """(the regression check from ``run_a`` (old) to ``run_b`` (new), notes): the paired
        bootstrap of new - old on the boxes both run directories hold
        (`audit.store.compare.compare_runs`). The notes say why nothing could be judged (a run
        directory gone or without boxes); then every row says "cannot judge"."""
        old, new = self.results(run_a), self.results(run_b)
        boxes, notes, reasons = [], [], []
        for run_id in (run_a, run_b):
            folder = self.run_dir(run_id)
            table, reason = run_boxes(folder)
            boxes.append(table)
            if reason:
                reasons.append(reason)
                notes.append(f"{run_id}: {reason} ({folder}); cannot judge")
        table = compare_runs(old, new, *boxes, seed=seed,
                             cannot=reasons[0] if reasons else "")
        return table, notes


def run_row(run_dir: Path) -> dict[str, Any]:
    """The ``runs`` row of a run directory, from its run.json."""
    run = read_run_json(run_dir)
    return {
        "run_id": run["run_id"],
        "started_at": _parse_time(run.get("started_at")),
        "finished_at": _parse_time(run.get("finished_at")),
        "status": run.get("status", ""),
        "model_name": run["model"]["name"],
        "model_fingerprint": run["model"]["fingerprint"],
        "dataset_name": run["dataset"]["name"],
        "manifest_sha256": run["dataset"]["manifest_sha256"],
        "n_images": int(run["dataset"].get("n_images") or 0),
        "n_boxes": int(run["dataset"].get("n_boxes") or 0),
        "run_dir": str(Path(run_dir).resolve()),
        "settings_json": json.dumps(run.get("settings", {}), sort_keys=True, default=str),
    }


def result_rows(run_id: str, per_pathology: pd.DataFrame | None) -> list[dict[str, Any]]:
    """The ``pathology_results`` rows of a run's ``per_pathology`` table."""
    if per_pathology is None or not len(per_pathology):
        return []
    return [{"run_id": run_id, **{name: _clean(record.get(name)) for name in RESULT_COLUMNS}}
            for record in per_pathology.to_dict("records")]


def _widen_verdict_column(engine: Engine) -> None:
    """A registry created when verdicts were PASS/FAIL holds ``verdict`` as VARCHAR(8), too short
    for INCONCLUSIVE: widen it (PostgreSQL; SQLite does not enforce lengths)."""
    if engine.dialect.name != "postgresql":
        return
    columns = {c["name"]: c for c in inspect(engine).get_columns(results_table.name)}
    length = getattr(columns.get("verdict", {}).get("type"), "length", None)
    if length is not None and length < VERDICT_LENGTH:
        with engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE {results_table.name} ALTER COLUMN verdict "
                              f"TYPE VARCHAR({VERDICT_LENGTH})"))


def _numeric(df: pd.DataFrame) -> pd.DataFrame:
    """Numeric result columns as numbers: a column that is NULL in every row comes back from
    the database as `None` objects, which cannot be subtracted or compared."""
    df = df.copy()
    for name in FLOAT_RESULT_COLUMNS:
        if name in df.columns:
            df[name] = pd.to_numeric(df[name], errors="coerce").astype(float)
    return df


def _parse_time(value: Any) -> datetime | None:
    """A datetime, converted to UTC when it carries an offset: SQLite stores the wall-clock
    digits and drops the offset, so mixed offsets would otherwise sort wrongly."""
    if value in (None, ""):
        return None
    if not isinstance(value, datetime):
        value = datetime.fromisoformat(str(value))
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc)
    return value


def _clean(value: Any) -> Any:
    if value is None:
        return None
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    if hasattr(value, "item"):
        return value.item()
    return value
