"""A throwaway PostgreSQL server for tests.

`start_postgres()` runs `initdb` + `pg_ctl start` in a fresh temporary folder, listening on a
unix socket only (no TCP, so no port clash with anything else on the machine) and with trust
authentication for local connections. PostgreSQL refuses to run as root; when the tests run as
root the server runs as the `postgres` user (or `nobody`) via `runuser`.

Anything that prevents the server from starting raises `PostgresUnavailable(reason)`; the fixtures
turn that into a skip with the reason. Set `CXR_AUDIT_TEST_PG_URL` to an existing server's
`postgresql+psycopg2://...` URL (a role that may CREATE DATABASE) to use it instead.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

EXTERNAL_URL_ENV = "CXR_AUDIT_TEST_PG_URL"
SUPERUSER = "audit"
_counter = itertools.count()


class PostgresUnavailable(RuntimeError):
    """The throwaway server could not be started (the reason is the message)."""


def _pg_bin(name: str) -> str:
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    if candidates:
        return candidates[0]
    found = shutil.which(name)
    if found:
        return found
    raise PostgresUnavailable(f"PostgreSQL's {name} was not found (install postgresql)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_as_user() -> str | None:
    """The user to run the server as: None when not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise PostgresUnavailable("running as root and neither a 'postgres' nor a 'nobody' user "
                              "exists to run the server as")


@dataclass
class PostgresServer:
    """A running server; `url(db)` gives a SQLAlchemy URL, `new_database()` a fresh database."""

    base_url: str  # without the database name
    query: str = ""  # e.g. "?host=/tmp/x&port=5432"
    admin_db: str = "postgres"
    data_dir: Path | None = None
    root_dir: Path | None = None
    user: str | None = None
    pg_ctl: str | None = None
    created: list[str] = field(default_factory=list)

    def url(self, database: str) -> str:
        return f"{self.base_url}/{database}{self.query}"

    def new_database(self, prefix: str = "t") -> str:
        """Create an empty database and return its URL."""
        import psycopg2  # noqa: F401  (a clear ImportError before SQLAlchemy's)
        from sqlalchemy import create_engine, text

        name = f"{prefix}_{os.getpid()}_{next(_counter)}"
        engine = create_engine(self.url(self.admin_db), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        self.created.append(name)
        return self.url(name)

    def stop(self) -> None:
        if self.pg_ctl is None or self.data_dir is None:  # an external server: drop our databases
            self._drop_created()
            return
        _call([self.pg_ctl, "stop", "-D", str(self.data_dir), "-m", "immediate", "-w"],
              self.user, check=False, timeout=60)
        if self.root_dir is not None:
            shutil.rmtree(self.root_dir, ignore_errors=True)


    def _drop_created(self) -> None:
        if not self.created:
            return
        from sqlalchemy import create_engine, text

        engine = create_engine(self.url(self.admin_db), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                for name in self.created:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        except Exception:  # best effort: never fail a test run on cleanup
            pass
        finally:
            engine.dispose()
        self.created.clear()


def _call(cmd: list[str], user: str | None, check: bool = True,
          timeout: float = 120) -> subprocess.CompletedProcess:
    if user is not None:
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        if not os.path.exists(runuser):
            raise PostgresUnavailable("running as root but `runuser` is not available to drop "
                                      "privileges for the PostgreSQL server")
        cmd = [runuser, "-u", user, "--", *cmd]
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    env.pop("PGDATA", None)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd="/")
    except (OSError, subprocess.TimeoutExpired) as err:
        raise PostgresUnavailable(f"{Path(cmd[0]).name} failed: {err}") from err
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-800:]
        raise PostgresUnavailable(f"`{' '.join(cmd)}` exited {proc.returncode}: {tail}")
    return proc


def start_postgres(parent: Path | None = None) -> PostgresServer:
    """Start a throwaway server; raise PostgresUnavailable when that is impossible."""
    external = os.environ.get(EXTERNAL_URL_ENV)
    if external:
        base, _, database = external.rpartition("/")
        database, sep, query = database.partition("?")
        server = PostgresServer(base_url=base, query=sep + query,
                                admin_db=database or "postgres")
        try:
            from sqlalchemy import create_engine, text

            engine = create_engine(server.url(server.admin_db))
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
            finally:
                engine.dispose()
        except Exception as err:  # noqa: BLE001  (any failure means: not usable)
            raise PostgresUnavailable(f"${EXTERNAL_URL_ENV} server is not reachable: "
                                      f"{str(err).splitlines()[0]}") from err
        return server
    try:
        import psycopg2  # noqa: F401
    except ImportError as err:
        raise PostgresUnavailable(f"psycopg2 is not installed: {err}") from err

    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    user = _run_as_user()
    # The folder must be reachable by the server's user (pytest's tmp_path under root is 0700),
    # and short: a unix socket path is limited to ~107 bytes.
    root = Path(tempfile.mkdtemp(prefix="cxrpg-", dir=parent if user is None else None))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (root, sock):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    port = _free_port()
    server = PostgresServer(base_url=f"postgresql+psycopg2://{SUPERUSER}@",
                            query=f"?host={sock}&port={port}", data_dir=data, root_dir=root,
                            user=user, pg_ctl=pg_ctl)
    try:
        _call([initdb, "-D", str(data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
               "--no-sync", "--locale=C"], user)
        options = (f"-c listen_addresses='' -c unix_socket_directories='{sock}' -c port={port} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=200 -c shared_buffers=16MB")
        _call([pg_ctl, "start", "-D", str(data), "-w", "-t", "60", "-l",
               str(root / "server.log"), "-o", options], user)
    except PostgresUnavailable as err:
        log = root / "server.log"
        detail = log.read_text()[-600:] if log.exists() else ""
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise PostgresUnavailable(f"{err} {detail}".strip()) from err
    return server
