"""A real Prefect API server in a subprocess, for tests that need one (served deployments,
schedules, concurrency limits) rather than the embedded ephemeral server.

Use the `prefect_server` fixture (conftest.py: one server per test session), or
`PrefectServer` directly:

    with PrefectServer(home=tmp / "prefect_home") as server:
        env = server.client_env()          # for subprocesses: PREFECT_API_URL, PREFECT_HOME, ...
        with server.settings():            # for this process (prefect.settings overrides)
            ...

The server gets a private PREFECT_HOME (its SQLite database lives there), analytics off, the
UI off, and none of the caller's PREFECT_* variables (no inherited PREFECT_API_URL, profile or
API key). It is stopped with SIGTERM (uvicorn's graceful shutdown), then SIGKILL as a last
resort, on its own process group.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 180.0  # migrations on a slow, shared machine
STOP_TIMEOUT_S = 30.0

QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_UI_ENABLED": "false",
}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prefect_cli() -> str | None:
    """The `prefect` command of this interpreter's environment (or on PATH), if any."""
    beside = Path(sys.executable).with_name("prefect")
    if beside.exists() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("prefect")


def isolated_env(home: Path, **extra: str) -> dict[str, str]:
    """os.environ without any PREFECT_* variable, plus a private PREFECT_HOME, analytics off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(QUIET_ENV)
    env["PREFECT_HOME"] = str(home)
    env.update(extra)
    return env


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class PrefectServer:
    """`prefect server start` on 127.0.0.1 in a subprocess; `api_url` once started."""

    def __init__(self, home: Path, port: int | None = None,
                 server_env: dict[str, str] | None = None) -> None:
        self.home = Path(home)
        self.port = port or free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.log_path = self.home / "server.log"
        self.server_env = dict(server_env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def log_tail(self, chars: int = 4000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> PrefectServer:
        cli = prefect_cli()
        if cli is None:
            pytest.skip("the `prefect` command is not installed beside this Python or on PATH")
        self.home.mkdir(parents=True, exist_ok=True)
        env = isolated_env(self.home, **self.server_env)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [cli, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() signals only it
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited ({self.process.returncode}) before "
                                   f"answering:\n{self.log_tail()}")
            if api_healthy(self.api_url):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"prefect server did not answer {self.api_url}/health within "
                           f"{timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the server's process group, wait, SIGKILL if it is still there."""
        proc = self.process
        if proc is None:
            return self.returncode
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):  # stragglers of its group, if any
            os.killpg(proc.pid, signal.SIGKILL)
        self.returncode = proc.returncode
        self.process = None
        return self.returncode

    def client_env(self, home: Path | None = None, **extra: str) -> dict[str, str]:
        """Environment for a subprocess that talks to this server (and only to it)."""
        return isolated_env(home or self.home, PREFECT_API_URL=self.api_url, **extra)

    @contextlib.contextmanager
    def settings(self) -> Iterator[None]:
        """Point Prefect clients created in this process at this server."""
        from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url, PREFECT_API_KEY: None}):
            yield

    def __enter__(self) -> PrefectServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
