"""flows/server.py: Prefect's temporary server is started ahead of the flow, in a thread, only
when Prefect itself would start one (no API URL, ephemeral mode allowed)."""

from __future__ import annotations

import threading

import pytest
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_EPHEMERAL_ENABLED,
    temporary_settings,
)

from flows.server import start_temporary_server


class FakeServer:
    """Stands in for prefect.server.api.server.SubprocessASGIServer (a singleton)."""

    calls: list[str] = []
    fail = False

    def start(self) -> None:
        FakeServer.calls.append(threading.current_thread().name)
        if FakeServer.fail:
            raise RuntimeError("port in use")


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> type[FakeServer]:
    import prefect.server.api.server as server_module

    monkeypatch.setattr(server_module, "SubprocessASGIServer", FakeServer)
    FakeServer.calls, FakeServer.fail = [], False
    return FakeServer


def test_the_temporary_server_starts_in_a_thread_when_prefect_would_start_one(fake_server):
    with temporary_settings(updates={PREFECT_API_URL: None,
                                     PREFECT_SERVER_EPHEMERAL_ENABLED: True}):
        early = start_temporary_server()
        early.wait()
    assert fake_server.calls == ["prefect-temporary-server"]


@pytest.mark.parametrize("updates", [
    {PREFECT_API_URL: "http://127.0.0.1:4200/api", PREFECT_SERVER_EPHEMERAL_ENABLED: True},
    {PREFECT_API_URL: None, PREFECT_SERVER_EPHEMERAL_ENABLED: False},
], ids=["api-url-set", "ephemeral-off"])
def test_nothing_starts_when_prefect_would_not_start_a_temporary_server(fake_server, updates):
    with temporary_settings(updates=updates):
        start_temporary_server().wait()
    assert fake_server.calls == []


def test_a_failed_early_start_is_left_for_prefect_to_retry(fake_server):
    fake_server.fail = True
    with temporary_settings(updates={PREFECT_API_URL: None,
                                     PREFECT_SERVER_EPHEMERAL_ENABLED: True}):
        start_temporary_server().wait()  # no exception here
    assert fake_server.calls == ["prefect-temporary-server"]
