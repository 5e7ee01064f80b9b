"""A real, throwaway PostgreSQL server for the tests and the benchmarks: Debian's binaries, a cluster in a
temporary directory, a free loopback port. ``initdb`` and ``postgres`` refuse to run as root, so as root they run
as the ``postgres`` user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg

from triton_launcher.server import free_port

SUPERUSER = "capability"
"""The cluster's superuser (trust authentication on loopback: no password anywhere)."""


def postgres_binaries() -> Path | None:
    """The newest installed PostgreSQL's ``bin`` directory (Debian keeps it out of PATH), or None."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0)
    if candidates:
        return candidates[-1].parent
    found = shutil.which("postgres")
    return Path(found).parent if found else None


class PostgresServer:
    """One cluster: :meth:`start`, :meth:`database` for a fresh database's URL, :meth:`stop`/:meth:`restart`."""

    def __init__(self, max_connections: int = 200) -> None:
        binaries = postgres_binaries()
        if binaries is None:
            raise RuntimeError("no PostgreSQL server binaries: scripts/test installs Debian's postgresql package "
                               "(apt-get install postgresql)")
        self.binaries = binaries
        self.max_connections = max_connections
        self.port = free_port()
        # Outside pytest's private tmp tree: the postgres user must be able to reach it.
        self.root = Path(tempfile.mkdtemp(prefix="capability-postgres-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
        self.root.chmod(0o700)

    def _run(self, *command: str, timeout: float = 120) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, text=True, timeout=timeout)

    def start(self) -> PostgresServer:
        if not self.data.exists():
            self._run(str(self.binaries / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                      "--no-sync", "-E", "UTF8", "--locale=C.UTF-8")
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                   f"-c max_connections={self.max_connections} -c fsync=on")
        self._run(str(self.binaries / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", options, "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """``fast``: roll back open transactions, end sessions, shut down cleanly; ``immediate``: as in a crash."""
        self._run(str(self.binaries / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """The URL of a new, empty database."""
        name = "store_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def postgres_server(max_connections: int = 200) -> Iterator[PostgresServer]:
    server = PostgresServer(max_connections)
    try:
        yield server.start()
    finally:
        server.close()
