"""`cxr-audit serve` for real: a scheduled deployment on a real Prefect server.

A Prefect API server runs in a subprocess (tests/prefect_server.py) and `cxr-audit serve --cron`
runs in another, on a 4-image phantom manifest with the cheapest settings (random-init model,
Grad-CAM, localization only, no baselines). A cron schedule fires at most once a minute, so the
test reads the schedule back (the deployment's cron, and the runs the server's scheduler created
from it), then triggers two runs through Prefect's API back to back, the way the scheduler
creates them (Scheduled flow runs of the deployment, started by the serve process when due). It
checks that both complete, each finishes one run directory that the registry records, that the
runs never ran at the same time (`global_limit=1`: the second waits in AwaitingConcurrencySlot),
and that serve stops cleanly on SIGTERM (how a service manager stops it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.prefect_server import PrefectServer

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
CRON = "0 2 * * 1"
DEPLOYMENT = "schedule-test"
FLOW = "audit_run"
N_IMAGES = 4
SERVE_START_TIMEOUT_S = 240.0
RUNS_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 120.0

CHEAP_SETTINGS = {
    "methods": ["gradcam"],
    "baselines": [],
    "metrics": ["localization"],
    "batch_size": N_IMAGES,
    "device": "cpu",
    "progress": False,
}


@dataclass
class Served:
    """A running `cxr-audit serve` process and where it writes."""

    proc: subprocess.Popen[bytes]
    server: PrefectServer
    out: Path
    registry: Path
    manifest: Path
    stdout: Path
    stderr: Path

    def logs(self, chars: int = 6000) -> str:
        text = [f"--- serve stdout\n{self.stdout.read_text(errors='replace')[-chars:]}",
                f"--- serve stderr\n{self.stderr.read_text(errors='replace')[-chars:]}",
                f"--- server log\n{self.server.log_tail(chars // 2)}"]
        return "\n".join(text)


def _sync_client() -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


@pytest.fixture(scope="module")
def phantom_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-image phantom set ingested into a manifest (in this process: no Prefect involved)."""
    from audit.data.manifest import ingest
    from audit.phantom.dataset import write_phantom_dataset

    root = tmp_path_factory.mktemp("phantom")
    dataset = write_phantom_dataset(root / "data", n_images=N_IMAGES, seed=0, n_dicom=0)
    result = ingest(dataset.images_dir, bboxes_csv=dataset.bbox_csv,
                    labels_csv=dataset.labels_csv, name="phantom_schedule",
                    out_dir=root / "manifests", workers=1, progress=False)
    assert result.n_images == N_IMAGES and result.n_boxes >= 1 and result.n_rejects == 0
    return Path(result.manifest_csv)


def _stop_serve(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> int:
    """Stop the serve process as a service manager does (systemd, Docker, Kubernetes): SIGTERM,
    which Prefect's runner handles with a graceful shutdown; SIGKILL its process group as a last
    resort. (Ctrl-C's SIGINT was the first choice, but in two of four full suite runs serve
    never answered it, printing nothing: an open question about Prefect 3.9's runner.)"""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
            return -signal.SIGKILL
    return int(proc.returncode)


@pytest.fixture(scope="module")
def served(prefect_server: PrefectServer, phantom_manifest: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`cxr-audit serve --cron` running against the test server until its deployment exists."""
    root = tmp_path_factory.mktemp("serve")
    config = root / "audit.toml"
    config.write_text("[audit]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                            for k, v in CHEAP_SETTINGS.items()))
    out, registry = root / "out", root / "registry.sqlite"
    env = prefect_server.client_env(
        home=root / "prefect_home",
        PREFECT_RUNNER_POLL_FREQUENCY="1",  # default 10 s between polls for due runs
        OMP_NUM_THREADS="1",
    )
    args = [sys.executable, "-m", "audit.cli", "serve", "--cron", CRON, "--name", DEPLOYMENT,
            "--config", str(config), "--manifest", str(phantom_manifest), "--random-init",
            "--out", str(out), "--registry", str(registry)]
    stdout, stderr = root / "serve.out", root / "serve.err"
    with open(stdout, "wb") as out_file, open(stderr, "wb") as err_file:
        proc = subprocess.Popen(args, env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                stdout=out_file, stderr=err_file, start_new_session=True)
    handle = Served(proc, prefect_server, out, registry, phantom_manifest, stdout, stderr)
    try:
        deadline = time.monotonic() + SERVE_START_TIMEOUT_S
        with prefect_server.settings(), _sync_client() as client:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"serve exited ({proc.returncode}) before its deployment "
                                f"appeared:\n{handle.logs()}")
                try:
                    client.read_deployment_by_name(f"{FLOW}/{DEPLOYMENT}")
                    break
                except Exception as err:  # ObjectNotFound until serve has registered it
                    if time.monotonic() > deadline:
                        pytest.fail(f"no deployment {FLOW}/{DEPLOYMENT} after "
                                    f"{SERVE_START_TIMEOUT_S:.0f} s ({err!r}):\n{handle.logs()}")
                time.sleep(0.5)
        yield handle
    finally:
        _stop_serve(proc)


def test_serve_registers_the_cron_schedule_and_the_concurrency_limit(served: Served) -> None:
    with served.server.settings(), _sync_client() as client:
        deployment = client.read_deployment_by_name(f"{FLOW}/{DEPLOYMENT}")
        assert not deployment.paused
        assert len(deployment.schedules) == 1
        schedule = deployment.schedules[0]
        assert schedule.active
        assert schedule.schedule.cron == CRON
        tz = ZoneInfo(schedule.schedule.timezone or "UTC")
        assert deployment.global_concurrency_limit is not None
        assert deployment.global_concurrency_limit.limit == 1
        strategy = getattr(deployment.concurrency_options, "collision_strategy", None)
        assert strategy in (None, "ENQUEUE"), strategy  # None: the server's default, ENQUEUE
        assert deployment.parameters["settings"]["manifest"] == str(served.manifest)
        assert deployment.parameters["settings"]["methods"] == ["gradcam"]

        # The server's scheduler turns the cron into future runs: Mondays at 02:00.
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        deadline = time.monotonic() + 60
        only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        while True:
            runs = [run for run in client.read_flow_runs(deployment_filter=only_this)
                    if run.auto_scheduled]
            if runs or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert runs, "the server's scheduler created no run from the cron schedule in 60 s"
    for run in runs:
        when = run.expected_start_time.astimezone(tz)
        assert (when.weekday(), when.hour, when.minute) == (0, 2, 0), when
        assert run.state.is_scheduled()
        assert when > datetime.now(tz)


def _utc(value: Any) -> datetime:
    """An aware UTC datetime (SQLite gives the registry's times back without a zone)."""
    when = value.to_pydatetime() if hasattr(value, "to_pydatetime") else value
    if when.tzinfo is None:
        return when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc)


def _poll_until_final(client: Any, run_ids: list[Any]) -> tuple[dict[Any, Any], list[str]]:
    """Read the runs until all are final; note every moment more than one was RUNNING.

    Runs read RUNNING in two passes, one after the other, were all RUNNING between the passes
    (a run without retries enters RUNNING once).
    """
    overlaps: list[str] = []
    deadline = time.monotonic() + RUNS_TIMEOUT_S

    def running(ids: list[Any]) -> tuple[dict[Any, Any], set[Any]]:
        runs = {rid: client.read_flow_run(rid) for rid in ids}
        return runs, {rid for rid, run in runs.items() if run.state and run.state.is_running()}

    while True:
        runs, first_pass = running(run_ids)
        if len(first_pass) > 1:
            both = first_pass & running(list(first_pass))[1]
            if len(both) > 1:
                overlaps.append(f"{datetime.now().isoformat()}: {len(both)} runs RUNNING")
        if all(run.state and run.state.is_final() for run in runs.values()):
            return runs, overlaps
        if time.monotonic() > deadline:
            states = {str(rid): run.state.name if run.state else None
                      for rid, run in runs.items()}
            raise AssertionError(f"runs not final after {RUNS_TIMEOUT_S:.0f} s: {states}")
        time.sleep(0.25)


def test_two_triggered_runs_complete_one_at_a_time_and_register(served: Served) -> None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment

    from audit.store.registry import Registry

    with served.server.settings(), _sync_client() as client:
        # As the scheduler would: Scheduled runs of the deployment, due now; serve starts them.
        triggered = [run_deployment(f"{FLOW}/{DEPLOYMENT}", timeout=0, as_subflow=False)
                     for _ in range(2)]
        ids = [run.id for run in triggered]
        try:
            runs, overlaps = _poll_until_final(client, ids)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{served.logs()}") from err
        histories = {rid: [s.name for s in client.read_flow_run_states(rid)] for rid in ids}
        audit_run_ids = {}
        for rid in ids:
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[rid])))
            summaries = [a.description for a in artifacts if a.key == "cxr-audit-summary"]
            assert len(summaries) == 1, (rid, [a.key for a in artifacts])
            audit_run_ids[rid] = summaries[0].removeprefix("cxr-audit run ")

    detail = f"states: {histories}\n{served.logs()}"
    assert all(run.state.is_completed() for run in runs.values()), detail

    # The concurrency limit held: never two RUNNING at once, and the time intervals are disjoint.
    assert not overlaps, f"both runs RUNNING at once ({len(overlaps)} polls): {overlaps[:3]}"
    first, second = sorted(runs.values(), key=lambda run: run.start_time)
    assert first.end_time <= second.start_time, (
        f"runs overlapped: {first.name} ran {first.start_time} .. {first.end_time}, "
        f"{second.name} ran {second.start_time} .. {second.end_time}"
    )
    # ... because the server held the second back (ENQUEUE), not because the runner was slow.
    assert "AwaitingConcurrencySlot" in histories[second.id], histories[second.id]

    # One finished run directory per completed flow run, each recorded in the registry.
    finished = sorted(p for p in served.out.glob("run-*") if (p / "run.json").exists())
    assert [p.name for p in finished] == sorted(audit_run_ids.values())
    assert not list(served.out.glob(".run-*.partial"))
    history = Registry(str(served.registry)).history()
    assert sorted(history["run_id"]) == sorted(audit_run_ids.values())
    assert set(history["status"]) == {"finished"}
    assert sorted(history["run_dir"]) == [str(p.resolve()) for p in finished]
    assert set(history["n_images"]) == {N_IMAGES}
    for rid, audit_id in audit_run_ids.items():  # each audit ran inside its own flow run
        row = history[history["run_id"] == audit_id].iloc[0]
        span = [_utc(runs[rid].start_time), _utc(row["started_at"]), _utc(row["finished_at"]),
                _utc(runs[rid].end_time)]
        assert span == sorted(span), (audit_id, runs[rid].name, span)


def test_serve_shuts_down_cleanly_on_sigterm(served: Served) -> None:
    assert served.proc.poll() is None, f"serve died early:\n{served.logs()}"
    started = time.monotonic()
    code = _stop_serve(served.proc)
    elapsed = time.monotonic() - started
    assert code == 0, f"serve exited {code} after {elapsed:.1f} s:\n{served.logs()}"
    stderr = served.stderr.read_text(errors="replace")
    assert "Traceback" not in stderr, stderr[-6000:]
    assert "SIGTERM received, initiating graceful shutdown" in stderr, stderr[-6000:]
    errors = [line for line in stderr.splitlines() if "| ERROR" in line or "| CRITICAL" in line]
    assert not errors, "\n".join(errors)
    left = _group_members(served.proc.pid, wait=10.0)
    assert not left, f"serve's process group outlived it:\n{left}"
    # Prefect's serve pauses its deployments on shutdown (pause_on_shutdown=True): the server
    # schedules nothing for a deployment that nobody serves any more.
    with served.server.settings(), _sync_client() as client:
        assert client.read_deployment_by_name(f"{FLOW}/{DEPLOYMENT}").paused


def _group_members(pgid: int, wait: float) -> str:
    """The live (not zombie) processes of a process group after up to `wait` seconds, or ''.

    A child that exits together with serve (multiprocessing's resource tracker, started with the
    first flow-run process, exits when serve closes its pipe) is briefly a zombie of PID 1:
    dead, so it does not count.
    """
    deadline = time.monotonic() + wait
    while True:
        live = _live_members(pgid)
        if not live or time.monotonic() > deadline:
            return "\n".join(live)
        time.sleep(0.2)


def _live_members(pgid: int) -> list[str]:
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: any member at all
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [f"process group {pgid} still has members"]
    live = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name_end = text.rindex(")")
        fields = text[name_end + 2:].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(f"{text[:name_end + 1]} state {fields[0]}")
    return live
