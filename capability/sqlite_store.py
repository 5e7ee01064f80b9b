"""The SQLite capability store: one file (WAL) on one host, safe for several processes and threads at once.

Each thread gets its own connection. Writes run in ``BEGIN IMMEDIATE`` transactions, so a writer takes the
write lock before reading what it will change and two writers never interleave; a process killed in the middle
of a write leaves the last committed state (SQLite's journal rolls the rest back). The schema version is
SQLite's ``user_version``; :data:`MIGRATIONS` brings any older file up to date when it is opened.

Every SQLite failure reaches callers as a :class:`StoreError` naming the file, what is wrong with it and what
to do (a raw ``sqlite3.OperationalError: database is locked`` says neither). The store never re-creates, repairs
or adopts a file it cannot read as its own: a damaged or foreign file is refused and left as it is.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from inference_client.state import state_dir_problem

from .errors import StoreError
from .store import Store

BUSY_TIMEOUT_MS = 15_000
"""How long a write waits for another process's write transaction before StoreError says the store is locked."""

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
    # 2: a registered server's gRPC address (host:port), for streaming; NULL when not given.
    """
    ALTER TABLE servers ADD COLUMN grpc_address TEXT;
    """,
    # 3: bearer tokens of the HTTP service (capability.tokens), as digests only.
    """
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        digest TEXT NOT NULL,
        entity TEXT NOT NULL,
        issued_by TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL,
        revoked_at REAL
    );
    CREATE INDEX tokens_by_entity ON tokens(entity);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
STORE_TABLES = frozenset({"capabilities", "leases", "lease_budgets", "audit", "servers"})
"""The tables every store has from schema version 1 on: a file without them is not a capability store."""
TABLES_SINCE = {"tokens": 3}
"""Tables added by later migrations, and the schema version that added them."""


class SQLiteStore(Store):
    """Connections to one store file; create it (mode 0600) and migrate it on first use."""

    dialect = "sqlite"

    def __init__(self, path: Path, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.path = path
        self.url = f"sqlite://{path}"
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._create_private_file()
        try:
            self._migrate()
        except BaseException:
            self.close()  # a refused file is not held open (nor its -wal and -shm files left) until collected
            raise

    def _create_private_file(self) -> None:
        """The store holds server keys and rights: its directory and files must be this user's alone.

        Created 0600 before SQLite opens it (SQLite gives its -wal and -shm files the database's mode); a
        symbolic link, a file of another user, or a journal someone else planted is refused.
        """
        directory = self.path.parent
        try:
            if not directory.exists():
                directory.mkdir(mode=0o700, parents=True)
        except OSError as error:
            raise StoreError(f"cannot create the state dir {directory} for the capability store "
                             f"({error.strerror or error}): it must be a directory this user can create and write "
                             "to") from error
        try:
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
            raise StoreError(f"cannot open the capability store {self.path} for reading and writing "
                             f"({error.strerror or error}): it must be a regular file this user can read and write, "
                             f"in a state dir this user can create files in (SQLite adds -wal and -shm files "
                             f"there)") from error

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections must not be shared between threads)."""
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None or getattr(self._local, "pid", None) != os.getpid():
            try:
                connection = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None,
                                             check_same_thread=True, factory=StoreConnection)
            except sqlite3.Error as error:
                raise store_error(error, self.path, self.busy_timeout_ms) from error
            connection.store_path = self.path
            connection.busy_timeout_ms = self.busy_timeout_ms
            try:
                connection.row_factory = sqlite3.Row
                # Before switching to WAL, which rewrites the header of a file that may not be ours.
                self._schema_version(connection)
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=FULL")  # a revocation must survive a power cut too
                connection.execute("PRAGMA foreign_keys=ON")
                connection.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
            except StoreError:
                connection.close()
                raise
            self._local.connection = connection
            self._local.pid = os.getpid()
        return connection

    @contextlib.contextmanager
    def write(self, lock: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        """A write transaction: all of it commits, or (on any exception, or a crash) none of it.

        ``IMMEDIATE`` takes the write lock at once; ``EXCLUSIVE`` (migrations) keeps readers out as well.
        """
        connection = self.connection()
        connection.execute(f"BEGIN {lock}")
        try:
            yield connection
        except BaseException:
            self._roll_back(connection)
            raise
        try:
            connection.execute("COMMIT")
        except StoreError:
            # A failed COMMIT may leave the transaction open (busy): end it, so that nothing of it is written
            # later by an unrelated COMMIT on this connection.
            self._roll_back(connection)
            raise

    @staticmethod
    def _roll_back(connection: sqlite3.Connection) -> None:
        # SQLite has already rolled back after some errors (disk full, I/O error): a second ROLLBACK would fail
        # and hide the error that matters.
        if connection.in_transaction:
            with contextlib.suppress(StoreError):
                connection.execute("ROLLBACK")

    def read(self) -> sqlite3.Connection:
        """A connection for reads; each statement sees the last committed state."""
        return self.connection()

    def now(self, db: Any) -> float:
        """This host's clock: a SQLite store has no other host to agree with."""
        return time.time()

    def close(self) -> None:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    def _migrate(self) -> None:
        with self.write("EXCLUSIVE") as connection:
            version = self._schema_version(connection)  # again: another process may have migrated meanwhile
            for number in range(version, SCHEMA_VERSION):
                for statement in _statements(MIGRATIONS[number]):
                    connection.execute(statement)
            if version < SCHEMA_VERSION:
                connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _schema_version(self, connection: sqlite3.Connection) -> int:
        """The file's schema version, 0 for a new empty file; StoreError if the file is not a capability store."""
        version = int(connection.execute("PRAGMA user_version").fetchone()["user_version"])
        if version > SCHEMA_VERSION:  # its tables may differ from ours: say what the operator must do
            raise StoreError(
                f"capability store {self.path} has schema version {version}, newer than this code's "
                f"{SCHEMA_VERSION}: upgrade the capability package"
            )
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version == 0 and tables:
            # Someone else's SQLite database: adding our tables to it would change a file that is not ours.
            raise StoreError(
                f"{self.path} is an SQLite database but not a capability store (no schema version; it holds "
                f"the tables {', '.join(sorted(tables))}): it was left unchanged; point --state-dir at the "
                "right directory, or move the file aside to start an empty store"
            )
        missing = tables_at(version) - tables
        if version > 0 and missing:
            raise StoreError(
                f"{self.path} says it is a capability store (schema version {version}) but lacks the tables "
                f"{', '.join(sorted(missing))}: it was left unchanged; restore it from a backup"
            )
        return version


class StoreConnection(sqlite3.Connection):
    """A connection whose statements raise StoreError, naming the file and what to do, instead of sqlite3.Error.

    The store's callers (capabilities.py, servers.py) run SQL on it directly; translating here covers them all.
    """

    store_path: Path
    busy_timeout_ms: int

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        return self.cursor(StoreCursor).execute(sql, parameters)

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> sqlite3.Cursor:
        return self.cursor(StoreCursor).executemany(sql, parameters)


class StoreCursor(sqlite3.Cursor):
    """A cursor of a :class:`StoreConnection`. Fetches translate errors too: SQLite reads a damaged page only
    when a fetch reaches it."""

    def execute(self, sql: str, parameters: Any = (), /) -> StoreCursor:
        with self._translated():
            return super().execute(sql, parameters)

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any], /) -> StoreCursor:
        with self._translated():
            return super().executemany(sql, seq_of_parameters)

    def fetchone(self) -> Any:
        with self._translated():
            return super().fetchone()

    def fetchmany(self, size: int | None = 1) -> list[Any]:
        with self._translated():
            return super().fetchmany(size)

    def fetchall(self) -> list[Any]:
        with self._translated():
            return super().fetchall()

    def __next__(self) -> Any:
        with self._translated():
            return super().__next__()

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as error:
            connection = self.connection
            assert isinstance(connection, StoreConnection)
            # Finalise the failed statement now: the traceback keeps this cursor alive, and while its statement
            # lives, closing the connection leaves the file open (and its -wal and -shm files behind).
            with contextlib.suppress(sqlite3.Error):
                self.close()
            raise store_error(error, connection.store_path, connection.busy_timeout_ms) from error


def store_error(error: sqlite3.Error, path: Path, busy_timeout_ms: int) -> StoreError:
    """What went wrong with the store file, in words an operator can act on (SQLite's own words included)."""
    # Python 3.11 names the SQLite result code; 3.10 gives only the message.
    code = str(getattr(error, "sqlite_errorname", ""))
    message = str(error)
    for prefix, phrase, explanation in _EXPLANATIONS:
        if code.startswith(prefix) or phrase in message:
            return StoreError(explanation.format(path=path, message=message, directory=path.parent,
                                                 seconds=f"{busy_timeout_ms / 1000:g}"))
    return StoreError(f"capability store {path}: {message}")


_EXPLANATIONS: tuple[tuple[str, str, str], ...] = (
    # (SQLite result code prefix, the words of its message, what to tell the operator)
    ("SQLITE_BUSY", "database is locked",
     "capability store {path} is locked by another process ({message}, still after {seconds} s): nothing was "
     "written; retry when that process has finished (fuser {path} names it)"),
    ("SQLITE_LOCKED", "database table is locked",
     "capability store {path} is locked by another connection ({message}): nothing was written; retry"),
    ("SQLITE_NOTADB", "file is not a database",
     "capability store {path} is not an SQLite database ({message}): it was left as it is; restore it from a "
     "backup, or move it aside and run python -m capability init to start an empty store"),
    ("SQLITE_CORRUPT", "malformed",
     "capability store {path} is damaged ({message}): it was left as it is; restore it from a backup, or move "
     "it aside and run python -m capability init to start an empty store"),
    ("SQLITE_READONLY", "readonly database",
     "capability store {path} is read-only ({message}): nothing was written; this user must be able to write "
     "the file and create files in {directory}"),
    ("SQLITE_CANTOPEN", "unable to open database file",
     "cannot open the capability store {path} ({message}): this user must be able to read and write it and "
     "create files in {directory} (SQLite adds -wal and -shm files)"),
    ("SQLITE_FULL", "database or disk is full",
     "no space left for the capability store {path} ({message}): nothing was written; free some disk space "
     "and retry"),
    ("SQLITE_IOERR", "disk I/O error",
     "the disk failed reading or writing the capability store {path} ({message}): check the disk; the last "
     "write may not have been saved"),
)


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


def tables_at(version: int) -> frozenset[str]:
    """The tables a store at schema ``version`` must have."""
    return STORE_TABLES | {table for table, since in TABLES_SINCE.items() if version >= since}
