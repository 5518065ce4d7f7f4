"""Start Prefect's temporary API server ahead of a flow.

With no API URL configured, Prefect starts a temporary server (a uvicorn subprocess) when the
first flow run begins, which in `cxr-audit run` is after this process has imported torch and the
model code. `start_temporary_server` starts that same server (Prefect's `SubprocessASGIServer`
singleton) in a thread, so the server boots in its process while this one imports; `wait`
returns once it answers (the flow then finds it running). When an API URL is set, or Prefect
would not start a temporary server, nothing happens and Prefect behaves as it always does.
"""

from __future__ import annotations

import threading


class EarlyServer:
    """A temporary server starting in a thread (or nothing to wait for)."""

    def __init__(self, thread: threading.Thread | None = None):
        self._thread = thread

    def wait(self) -> None:
        """Block until the start has ended, however it ended: a failed start is left for
        Prefect to retry (and report) when the flow begins."""
        if self._thread is not None:
            self._thread.join()


def start_temporary_server() -> EarlyServer:
    """Begin starting Prefect's temporary server now, when the settings say Prefect would start
    one (no ``PREFECT_API_URL``, ephemeral mode allowed)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return EarlyServer()
    # Imported here, in the calling thread: the thread below imports nothing.
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()

    def start() -> None:
        try:
            server.start()
        except Exception:  # noqa: BLE001 - Prefect starts it again when the flow begins
            pass

    thread = threading.Thread(target=start, name="prefect-temporary-server", daemon=True)
    thread.start()
    return EarlyServer(thread)
