"""The capability store: one SQLite file (WAL), safe for several processes and threads at once.

Each thread gets its own connection. Writes run in ``BEGIN IMMEDIATE`` transactions, so a writer takes the
write lock before reading what it will change and two writers never interleave; a process killed in the middle
of a write leaves the last committed state (SQLite's journal rolls the rest back). The schema version is
SQLite's ``user_version``; :data:`MIGRATIONS` brings any older file up to date when it is opened.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from triton_launcher.server import state_dir_problem

from .errors import StoreError

STORE_FILE = "capabilities.sqlite3"
"""File name of the store inside the launcher's state dir."""

BUSY_TIMEOUT_MS = 15_000

MIGRATIONS: tuple[str, ...] = (
    # 1: capabilities, concurrency leases, audit log, known servers.
    """
    CREATE TABLE capabilities (
        id TEXT PRIMARY KEY,
        type TEXT NOT NULL,
        owner TEXT NOT NULL,
        params TEXT NOT NULL,
        parent_id TEXT REFERENCES capabilities(id),
        created_at REAL NOT NULL,
        expires_at REAL,
        revoked_at REAL
    );
    CREATE INDEX capabilities_by_owner ON capabilities(owner);
    CREATE INDEX capabilities_by_parent ON capabilities(parent_id);

    CREATE TABLE leases (
        id TEXT PRIMARY KEY,
        capability_id TEXT NOT NULL REFERENCES capabilities(id),
        holder TEXT NOT NULL,
        acquired_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    -- One row per capability whose max_concurrent budget a lease counts against: its own and its ancestors'.
    CREATE TABLE lease_budgets (
        lease_id TEXT NOT NULL REFERENCES leases(id) ON DELETE CASCADE,
        capability_id TEXT NOT NULL,
        PRIMARY KEY (lease_id, capability_id)
    );
    CREATE INDEX lease_budgets_by_capability ON lease_budgets(capability_id);

    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        entity TEXT NOT NULL,
        capability_id TEXT,
        action TEXT NOT NULL,
        outcome TEXT NOT NULL,
        model TEXT,
        width INTEGER,
        height INTEGER,
        steps INTEGER,
        detail TEXT
    );
    CREATE INDEX audit_by_capability ON audit(capability_id);

    CREATE TABLE servers (
        url TEXT PRIMARY KEY,
        infer_key TEXT NOT NULL,
        registered_at REAL NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class Store:
    """Connections to one store file; create it (mode 0600) and migrate it on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._create_private_file()
        self._migrate()

    def _create_private_file(self) -> None:
        """The store holds server keys and rights: its directory and files must be this user's alone.

        Created 0600 before SQLite opens it (SQLite gives its -wal and -shm files the database's mode); a
        symbolic link, a file of another user, or a journal someone else planted is refused.
        """
        directory = self.path.parent
        try:
            if not directory.exists():
                directory.mkdir(mode=0o700, parents=True)
            problem = state_dir_problem(directory)
            if problem:
                raise StoreError(f"capability store: {problem}")
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            os.close(descriptor)
            for path in (self.path, self.path.with_name(self.path.name + "-wal"),
                         self.path.with_name(self.path.name + "-shm")):
                if path.exists() or path.is_symlink():
                    _check_private(path)
        except OSError as error:
            raise StoreError(f"cannot open the capability store {self.path}: {error.strerror or error}") from error

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections must not be shared between threads)."""
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None or getattr(self._local, "pid", None) != os.getpid():
            try:
                connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                             check_same_thread=True)
                connection.row_factory = sqlite3.Row
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=FULL")  # a revocation must survive a power cut too
                connection.execute("PRAGMA foreign_keys=ON")
                connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            except sqlite3.Error as error:
                raise StoreError(f"cannot open the capability store {self.path}: {error}") from error
            self._local.connection = connection
            self._local.pid = os.getpid()
        return connection

    @contextlib.contextmanager
    def write(self, lock: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        """A write transaction: all of it commits, or (on any exception, or a crash) none of it.

        ``IMMEDIATE`` takes the write lock at once; ``EXCLUSIVE`` (migrations) keeps readers out as well.
        """
        connection = self.connection()
        try:
            connection.execute(f"BEGIN {lock}")
        except sqlite3.Error as error:
            raise StoreError(f"capability store {self.path} is busy or unwritable: {error}") from error
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def read(self) -> sqlite3.Connection:
        """A connection for reads; each statement sees the last committed state."""
        return self.connection()

    def close(self) -> None:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    def _migrate(self) -> None:
        with self.write("EXCLUSIVE") as connection:
            version = int(connection.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"capability store {self.path} has schema version {version}, newer than this code's "
                    f"{SCHEMA_VERSION}: upgrade the capability package"
                )
            for number in range(version, SCHEMA_VERSION):
                for statement in _statements(MIGRATIONS[number]):
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def _check_private(path: Path) -> None:
    status = path.lstat()
    if stat.S_ISLNK(status.st_mode) or not stat.S_ISREG(status.st_mode):
        raise StoreError(f"capability store file {path} is not a regular file")
    mode = stat.S_IMODE(status.st_mode)
    if status.st_uid != os.getuid() or mode & 0o077:
        raise StoreError(f"capability store file {path} (mode {mode:o}) must belong to this user and be readable "
                         f"by it alone (chmod 600 {path})")


def _statements(script: str) -> list[str]:
    # executescript() would commit the open transaction; run the statements one by one inside it instead.
    # Our DDL has no semicolons inside literals.
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    return [statement.strip() for statement in "\n".join(lines).split(";") if statement.strip()]
