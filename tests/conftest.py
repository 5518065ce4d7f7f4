"""Shared pytest fixtures: where the real data lives, the thread counts numerical tests run
under, and one closing line per group of skipped tests."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.external import STRICT_ENV, missing, strict
from tests.prefect_server import PrefectServer

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

#: Intra-op thread counts every numerical comparison runs under: a reduction whose result
#: depends on how work is split across threads shows up here, not on a user's machine. The
#: second count is marked slow: a developer's fast set (``-m "not slow"``) runs each comparison
#: once, CI runs both.
THREAD_COUNTS = (1, pytest.param(2, marks=pytest.mark.slow))


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker's default intra-op threads are its share of the cores,
    unless OMP_NUM_THREADS was set: two workers of two threads each on two cores made OpenMP
    wait on itself (the fast set took 2:27 instead of 1:58). Tests that pick a count
    (`torch_threads`) still get it; subprocesses (`cxr-audit run`) keep torch's default."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _require(path: Path) -> Path:
    if not path.exists():
        missing("shared-data", f"real data not available: {path} is absent (run beside ../shared)")
    return path


@pytest.fixture(scope="session")
def nih_dev_dir() -> Path:
    """../shared/data/nih_bbox_dev (438 NIH PNGs, 491 boxes)."""
    return _require(SHARED_DATA / "nih_bbox_dev")


@pytest.fixture(scope="session")
def nih_unboxed_dir() -> Path:
    """../shared/data/nih_unboxed (22 NIH PNGs without boxes)."""
    return _require(SHARED_DATA / "nih_unboxed")


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    """../shared/data/dicom (5 real chest DICOMs)."""
    return _require(SHARED_DATA / "dicom")


@pytest.fixture(scope="module", params=THREAD_COUNTS, ids=("threads1", "threads2"))
def torch_threads(request: pytest.FixtureRequest):
    """Run the module's tests once per intra-op thread count (use with
    ``pytestmark = pytest.mark.usefixtures("torch_threads")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """One real Prefect API server for the test session (tests/prefect_server.py): every
    `cxr-audit` subprocess of the tests talks to it instead of starting its own embedded server.

    The enqueue delay of a deployment concurrency limit is 1 s (default 30 s) and the scheduler
    loops every 5 s (default 60 s), so tests see limits and schedules act quickly.
    """
    server = PrefectServer(
        tmp_path_factory.mktemp("prefect_server"),
        server_env={
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "1",
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        },
    )
    with server:
        yield server


#: The two longest modules, started first, one per xdist worker, so that the workers finish
#: together (xdist hands out modules in collection order with --no-loadscope-reorder).
LONGEST_FIRST = ("tests/test_demo.py", "tests/test_flows.py")


def pytest_collection_modifyitems(config, items) -> None:
    """The longest modules first, the rest in their usual order."""
    def rank(item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside each module is kept


_GROUP = re.compile(r"^\[([\w-]+)\] ")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One closing line per group of skipped tests (group, count, one reason), after pytest's
    short summary (this wrapper's code after ``yield`` runs last)."""
    result = yield
    _skipped_groups(terminalreporter)
    return result


def _skipped_groups(terminalreporter) -> None:
    reports = terminalreporter.stats.get("skipped", [])
    groups: Counter[str] = Counter()
    reasons: dict[str, str] = {}
    for report in reports:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        match = _GROUP.match(reason)
        group = match.group(1) if match else reason
        groups[group] += 1
        reasons.setdefault(group, reason[match.end():] if match else "")
    if not groups:
        return
    terminalreporter.section("skipped groups")
    for group, count in sorted(groups.items()):
        detail = f": {reasons[group]}" if reasons[group] else ""
        terminalreporter.write_line(f"SKIPPED GROUP {group} ({count} tests){detail}")
    if not strict():
        terminalreporter.write_line(f"(set {STRICT_ENV}=1 to make these failures, as CI does)")
