"""audit/store/: atomic file writes (files.py), run directories (rundir.py), the registry URL."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from audit.store import files as store
from audit.store.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_table,
    atomic_write_text,
    sha256_file,
)
from audit.store.registry import REGISTRY_ENV, registry_url
from audit.store.rundir import (
    RunDirectory,
    RunDirectoryError,
    new_run_id,
    read_run_json,
    read_table,
)


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ---------------------------------------------------------------------------------------------
# atomic writes


def test_atomic_write_bytes_writes_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    assert atomic_write_bytes(target, b"first") == target
    assert target.read_bytes() == b"first"
    atomic_write_bytes(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert _leftovers(target.parent, {"file.bin"}) == []


def test_atomic_write_gives_the_mode_a_plain_open_would(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"x")
    atomic = atomic_write_bytes(tmp_path / "atomic.txt", b"x")
    assert oct(atomic.stat().st_mode & 0o777) == oct(plain.stat().st_mode & 0o777)


@pytest.mark.parametrize("failure", ["write", "fsync", "replace"])
def test_atomic_write_bytes_failure_keeps_old_content(tmp_path, monkeypatch, failure):
    target = tmp_path / "table.csv"
    target.write_bytes(b"old content")
    data: object = b"new content"
    if failure == "write":
        data = "not bytes"  # the file object's write() raises TypeError mid-way
    elif failure == "fsync":
        def broken_fsync(fd):
            raise OSError("disk on fire")
        monkeypatch.setattr(store.os, "fsync", broken_fsync)
    else:
        def broken_replace(src, dst):
            raise OSError("rename refused")
        monkeypatch.setattr(store.os, "replace", broken_replace)

    with pytest.raises((OSError, TypeError)):
        atomic_write_bytes(target, data)  # type: ignore[arg-type]
    monkeypatch.undo()
    assert target.read_bytes() == b"old content"
    assert _leftovers(tmp_path, {"table.csv"}) == []


def test_atomic_write_interrupted_by_keyboard_interrupt_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    target.write_text("{}")

    def interrupted(fd):
        raise KeyboardInterrupt
    monkeypatch.setattr(store.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "{\"a\": 1}")
    monkeypatch.undo()
    assert target.read_text() == "{}"
    assert _leftovers(tmp_path, {"run.json"}) == []


def test_atomic_write_text_and_json(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    when = pd.Timestamp("2025-01-02T03:04:05Z")
    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1.5, None], "when": when})
    text = (tmp_path / "a.json").read_text()
    assert text.endswith("\n")
    assert json.loads(text) == {"a": [1.5, None], "b": 1, "when": str(when)}
    assert text.index('"a"') < text.index('"b"')  # sorted keys: stable bytes


def _sample_table() -> pd.DataFrame:
    return pd.DataFrame({
        "image_key": ["00000001_000.png", "00000002_000.png", "00000003_001.png"],
        "finding": ["Mass", "Nodule", "Atelectasis"],
        "box_index": [0, 1, 0],
        "iou": [0.25, np.nan, 0.125],
        "pointing_hit": [True, False, True],
        "iou_hit_0.1": [1.0, 0.0, 1.0],
    })


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_atomic_write_table_round_trips(tmp_path, suffix):
    df = _sample_table()
    path = atomic_write_table(df, tmp_path / f"boxes{suffix}")
    assert path.suffix == suffix
    back = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
    pd.testing.assert_frame_equal(back, df)
    assert _leftovers(tmp_path, {path.name}) == []
    # read_table finds it by stem
    pd.testing.assert_frame_equal(read_table(tmp_path, "boxes"), df)


def test_write_npz_round_trips_names_dtypes_and_values_and_compresses(tmp_path):
    import zipfile

    rng = np.random.default_rng(0)
    arrays = {"gradcam|Mass": rng.random((64, 64)), "thumb": np.arange(256, dtype=np.uint8),
              "half": rng.random((8, 8)).astype(np.float16), "zeros": np.zeros((128, 128))}
    path = store.write_npz(tmp_path / "maps.npz", arrays)
    with np.load(path) as loaded:
        assert sorted(loaded.files) == sorted(arrays)
        for name, array in arrays.items():
            assert loaded[name].dtype == array.dtype
            np.testing.assert_array_equal(loaded[name], array)
    with zipfile.ZipFile(path) as archive:  # deflated: the zero map shrinks ~100x
        info = archive.getinfo("zeros.npy")
        assert info.compress_type == zipfile.ZIP_DEFLATED
        assert info.compress_size < info.file_size / 50


def test_atomic_write_table_csv_has_unix_newlines_and_no_index(tmp_path):
    path = atomic_write_table(_sample_table(), tmp_path / "t.csv")
    raw = path.read_bytes()
    assert b"\r\n" not in raw
    assert raw.startswith(b"image_key,finding,")


def test_atomic_write_table_rejects_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match="unsupported"):
        atomic_write_table(_sample_table(), tmp_path / "t.xlsx")
    assert list(tmp_path.iterdir()) == []


def test_read_table_prefers_parquet_and_returns_none_when_absent(tmp_path):
    df = _sample_table()
    atomic_write_table(df, tmp_path / "boxes.parquet")
    atomic_write_table(df.head(1), tmp_path / "boxes.csv")
    assert len(read_table(tmp_path, "boxes")) == 3
    assert read_table(tmp_path, "curves") is None


def test_sha256_file(tmp_path):
    data = os.urandom(3 * 1024 + 7)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path, chunk=1024) == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# run directories


def test_run_directory_writes_to_staging_and_finish_renames(tmp_path):
    run = RunDirectory.create(tmp_path / "reports", "run-1")
    assert run.staging.is_dir() and not run.final.exists()
    assert run.path("x.csv").parent == run.staging

    run.write_table(_sample_table(), "boxes.parquet")
    run.write_table(_sample_table(), "per_pathology.csv")
    run.write_json("run.json", {"run_id": "run-1"})
    (run.staging / "thumbs").mkdir()
    (run.staging / "thumbs" / "a.png").write_bytes(b"written after run.json")
    assert sorted(p.name for p in run.staging.iterdir()) == [
        "boxes.parquet", "per_pathology.csv", "run.json", "thumbs"]
    assert not run.final.exists()  # nothing visible under the run id until finish()
    with pytest.raises(RunDirectoryError):
        read_run_json(run.staging.parent / "run-1")

    final = run.finish()
    assert final == tmp_path / "reports" / "run-1"
    assert not run.staging.exists()
    assert sorted(p.name for p in final.iterdir()) == [
        "boxes.parquet", "per_pathology.csv", "run.json", "thumbs"]
    # finish() sealed run.json: the sha256 of every other file, sub-folders included
    sealed = {name: hashlib.sha256((final / name).read_bytes()).hexdigest()
              for name in ("boxes.parquet", "per_pathology.csv", "thumbs/a.png")}
    assert read_run_json(final) == {"run_id": "run-1", "files": sealed}
    # only the finished directory is left in the root: no temp files, no staging folder
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["run-1"]


def test_creating_a_run_whose_final_dir_exists_raises(tmp_path):
    run = RunDirectory.create(tmp_path, "run-1")
    run.write_json("run.json", {"run_id": "run-1"})
    run.finish()
    before = (tmp_path / "run-1" / "run.json").read_bytes()
    with pytest.raises(RunDirectoryError, match="already exists"):
        RunDirectory.create(tmp_path, "run-1")
    assert (tmp_path / "run-1" / "run.json").read_bytes() == before
    assert not (tmp_path / ".run-1.partial").exists()


def test_finish_refuses_to_replace_a_run_that_appeared_meanwhile(tmp_path):
    run = RunDirectory.create(tmp_path, "run-1")
    run.write_json("run.json", {"run_id": "run-1", "who": "second"})
    (tmp_path / "run-1").mkdir()  # e.g. another process finished a run with the same id
    with pytest.raises(RunDirectoryError, match="already exists"):
        run.finish()
    assert list((tmp_path / "run-1").iterdir()) == []
    assert (run.staging / "run.json").exists()


def test_leftover_staging_from_a_killed_run_is_cleared(tmp_path):
    killed = tmp_path / ".run-7.partial"
    (killed / "maps").mkdir(parents=True)
    (killed / "boxes.parquet").write_bytes(b"half written")
    (killed / "maps" / "batch0.npz").write_bytes(b"junk")
    (killed / ".boxes.csv.abc.tmp").write_bytes(b"junk")

    run = RunDirectory.create(tmp_path, "run-7")
    assert run.staging == killed
    assert list(run.staging.iterdir()) == []
    run.write_json("run.json", {"run_id": "run-7"})
    assert sorted(p.name for p in run.finish().iterdir()) == ["run.json"]


def test_new_run_id_format_and_uniqueness():
    from datetime import datetime, timezone

    now = datetime(2025, 11, 20, 2, 3, 4, tzinfo=timezone.utc)
    run_id = new_run_id(now)
    assert re.fullmatch(r"run-20251120T020304Z-[0-9a-f]{6}", run_id)
    assert new_run_id(now, salt="a") != new_run_id(now, salt="b")
    assert len(new_run_id()) <= 64  # fits the registry's run_id column


# ---------------------------------------------------------------------------------------------
# the registry URL


@pytest.fixture
def no_registry_env(monkeypatch, tmp_path):
    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_registry_url_explicit_path_is_sqlite(no_registry_env):
    path = no_registry_env / "deep" / "reg.sqlite"
    url = registry_url(str(path))
    assert url == f"sqlite:///{path.resolve()}"
    assert path.parent.is_dir()  # the folder is created so SQLite can create the file


def test_registry_url_relative_path_is_resolved(no_registry_env):
    url = registry_url("sub/reg.sqlite")
    assert url == f"sqlite:///{(no_registry_env / 'sub' / 'reg.sqlite').resolve()}"
    assert url.startswith("sqlite:////")  # absolute: independent of a later chdir


def test_registry_url_default(no_registry_env):
    assert registry_url() == f"sqlite:///{(no_registry_env / 'runs' / 'registry.sqlite').resolve()}"
    assert (no_registry_env / "runs").is_dir()


def test_registry_url_environment_variable(no_registry_env, monkeypatch):
    monkeypatch.setenv(REGISTRY_ENV, str(no_registry_env / "env" / "reg.sqlite"))
    assert registry_url() == f"sqlite:///{(no_registry_env / 'env' / 'reg.sqlite').resolve()}"
    monkeypatch.setenv(REGISTRY_ENV, "postgresql+psycopg2://audit@db.example:5432/audits")
    assert registry_url() == "postgresql+psycopg2://audit@db.example:5432/audits"
    # an explicit argument wins over the environment
    assert registry_url("sqlite:///elsewhere.sqlite") == "sqlite:///elsewhere.sqlite"


@pytest.mark.parametrize("url", [
    "postgresql+psycopg2://user:secret@localhost:5432/cxr",
    "postgresql://user@/cxr?host=/var/run/postgresql",
    "sqlite:///relative.sqlite",
    "sqlite://",
])
def test_registry_url_full_urls_pass_through(no_registry_env, url):
    assert registry_url(url) == url
    assert not (no_registry_env / "runs").exists()
