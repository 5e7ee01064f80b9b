"""The PostgreSQL capability store: one state for every host, through psycopg 3 and its connection pool.

Guarantees, and how:

- **Budgets across hosts.** Taking a concurrency slot locks the rows of the capability's chain, root first
  (``SELECT … FOR UPDATE``), before it re-checks the chain and counts the leases, in one READ COMMITTED
  transaction. Every slot of one tree is then taken one at a time on every host, and a revocation or a give (an
  ``UPDATE`` of the same rows) either commits before the check, which sees it, or waits until the slot is taken.
  Explicit row locks rather than SERIALIZABLE: they cannot fail with serialization errors, so nothing needs to
  be retried, and they order only the writers of one tree; the fixed root-first order means two of them never
  wait for each other in a circle.
- **Time.** Expiry is judged by the database server's clock (:meth:`PostgresStore.now`), never a host's.
- **Durability.** A transaction commits whole or not at all; a client killed in the middle leaves the last
  committed state (PostgreSQL rolls the rest back when the connection drops). Committed rows survive a server
  restart (``synchronous_commit`` on, PostgreSQL's default). After a restart the pool checks each connection
  before handing it out, so the layer serves again without a restart of its own.
- **Errors** reach callers as :class:`StoreError`, naming the store (without a password) and what to do.

The password is never part of the URL (it would show in ``ps``, shell histories and logs): libpq reads it from
``PGPASSFILE`` (``~/.pgpass``), ``PGPASSWORD`` or a service file (``PGSERVICEFILE``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
import psycopg.errors
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from .errors import StoreError
from .store import Cursor, Store

logger = logging.getLogger(__name__)

POOL_SIZE_VARIABLE = "CAPABILITY_STORE_POOL_SIZE"
DEFAULT_POOL_SIZE = 10
"""Connections per process at most. Each generation holds one for a few milliseconds at its start and end."""
CONNECT_TIMEOUT_S = 10
STATEMENT_TIMEOUT_MS = 15_000
"""A statement that runs (or waits for a lock) longer than this is cancelled: StoreError, nothing written."""
POOL_TIMEOUT_S = 30.0
"""How long a caller waits for a free connection of the pool before StoreError says the pool is exhausted."""
_MIGRATION_LOCK = 0x6361706162696C69
"""pg_advisory_xact_lock key that serialises the schema's creation and migrations across hosts."""

MIGRATIONS: tuple[str, ...] = (
    # 1: capabilities, concurrency leases, audit log, known servers (by a reference to their key: no secrets).
    """
    CREATE TABLE capabilities (
        id TEXT PRIMARY KEY,
        type TEXT NOT NULL,
        owner TEXT NOT NULL,
        params TEXT NOT NULL,
        parent_id TEXT REFERENCES capabilities(id),
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION,
        revoked_at DOUBLE PRECISION
    );
    CREATE INDEX capabilities_by_owner ON capabilities(owner);
    CREATE INDEX capabilities_by_parent ON capabilities(parent_id);

    CREATE TABLE leases (
        id TEXT PRIMARY KEY,
        capability_id TEXT NOT NULL REFERENCES capabilities(id),
        holder TEXT NOT NULL,
        acquired_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX leases_by_expiry ON leases(expires_at);
    CREATE TABLE lease_budgets (
        lease_id TEXT NOT NULL REFERENCES leases(id) ON DELETE CASCADE,
        capability_id TEXT NOT NULL,
        PRIMARY KEY (lease_id, capability_id)
    );
    CREATE INDEX lease_budgets_by_capability ON lease_budgets(capability_id);

    CREATE TABLE audit (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
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
        infer_key_file TEXT NOT NULL,
        registered_at DOUBLE PRECISION NOT NULL,
        grpc_address TEXT
    );
    """,
    # 2: bearer tokens of the HTTP service (capability.tokens), as digests only.
    """
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        digest TEXT NOT NULL,
        entity TEXT NOT NULL,
        issued_by TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION,
        revoked_at DOUBLE PRECISION
    );
    CREATE INDEX tokens_by_entity ON tokens(entity);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
STORE_TABLES = frozenset({"capabilities", "leases", "lease_budgets", "audit", "servers"})
"""The tables every store has from schema version 1 on."""
TABLES_SINCE = {"tokens": 2}
"""Tables added by later migrations, and the schema version that added them."""


class PostgresStore(Store):
    """A pool of connections to one PostgreSQL database; the schema is created and migrated on first use."""

    dialect = "postgresql"
    row_lock = " FOR UPDATE OF c"
    clock_sql = "EXTRACT(EPOCH FROM clock_timestamp())"
    stores_secrets = False
    """Server keys are not kept here, only the path of a file each host reads (a mounted Secret, say): a database
    that every application host can read is no place for the key that opens every GPU server."""

    def __init__(self, url: str, *, pool_size: int | None = None,
                 statement_timeout_ms: int = STATEMENT_TIMEOUT_MS, pool_timeout_s: float = POOL_TIMEOUT_S) -> None:
        """``pool_timeout_s``: how long a caller waits for a connection (while the database is away, say) before
        StoreError."""
        self.url = _checked_url(url)
        self.pool_timeout_s = pool_timeout_s
        size = pool_size or _pool_size_from_environment()
        options = f"-c statement_timeout={int(statement_timeout_ms)} -c lock_timeout={int(statement_timeout_ms)}"
        self._pool = ConnectionPool(
            self.url, min_size=1, max_size=size, open=False, timeout=pool_timeout_s, name="capability-store",
            # A connection that broke (the server restarted) is found before a caller gets it, and replaced.
            check=_check_idle_connection,
            kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": CONNECT_TIMEOUT_S,
                    "options": options, "application_name": "capability-layer"},
        )
        try:
            with self._errors():
                # One connection first, so that a database that is not there says so at once, in libpq's words
                # (the pool would retry in the background and report only a timeout).
                psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT_S).close()
                self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S + 5)
            self._migrate()
        except BaseException:
            self.close()
            raise

    # --- the Store interface ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def write(self) -> Iterator[_Connection]:
        # Pipeline mode: statements go out without waiting for each other's results, and the client waits only
        # where it reads one (the chain it locks, the leases it counts) and at the commit. Releasing a slot with
        # its audit record (BEGIN, DELETE, INSERT, COMMIT) is then one round trip instead of four.
        with self._errors(), self._pool.connection() as connection, connection.pipeline() as pipeline, \
                connection.transaction():
            yield _Connection(connection, self, pipeline)

    def read(self) -> _Reads:
        return _Reads(self)

    def now(self, db: Any) -> float:
        row = db.execute(f"SELECT {self.clock_sql} AS now").fetchone()
        return float(row["now"])

    def close(self) -> None:
        self._pool.close()

    # --- internals ---------------------------------------------------------------------------------------------

    def _migrate(self) -> None:
        # Not pipelined: a migration is several statements in one string, which only the simple protocol takes.
        with self._errors(), self._pool.connection() as connection, connection.transaction():
            db = _Connection(connection, self)
            # One host at a time creates or migrates the schema; the others then find it done.
            db.execute("SELECT pg_advisory_xact_lock(:key)", {"key": _MIGRATION_LOCK})
            db.execute("CREATE TABLE IF NOT EXISTS capability_schema (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM capability_schema").fetchone()
            version = 0 if row is None else int(row["version"])
            if version > SCHEMA_VERSION:
                raise StoreError(f"capability store {self.url} has schema version {version}, newer than this code's "
                                 f"{SCHEMA_VERSION}: upgrade the capability package on this host")
            tables = {row["table_name"] for row in db.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")}
            if version == 0 and tables & STORE_TABLES:
                raise StoreError(f"database {self.url} holds tables named {', '.join(sorted(tables & STORE_TABLES))} "
                                 "but no capability schema version: they are not a capability store's, and were "
                                 "left unchanged; use another database (or schema) for the store")
            required = STORE_TABLES | {table for table, since in TABLES_SINCE.items() if version >= since}
            missing = required - tables
            if version > 0 and missing:
                raise StoreError(f"capability store {self.url} (schema version {version}) lacks the tables "
                                 f"{', '.join(sorted(missing))}: restore it from a backup")
            for number in range(version, SCHEMA_VERSION):
                db.execute(MIGRATIONS[number])
            if row is None:
                db.execute("INSERT INTO capability_schema (version) VALUES (:version)", {"version": SCHEMA_VERSION})
            elif version < SCHEMA_VERSION:
                db.execute("UPDATE capability_schema SET version = :version", {"version": SCHEMA_VERSION})

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except psycopg.Error as error:
            raise store_error(error, self.url) from error
        except PoolTimeout as error:
            raise StoreError(
                f"capability store {self.url}: no connection could be had within {self.pool_timeout_s:g} s ({error}): "
                "the database is unreachable or refuses connections, or every pooled connection is busy; check "
                f"that it runs, or raise {POOL_SIZE_VARIABLE} (and the server's max_connections)") from error


class _Connection:
    """A pooled connection inside a transaction: statements in SQLite's parameter style, errors as StoreError.
    In a pipeline, a statement's result is waited for only when it is read."""

    def __init__(self, connection: psycopg.Connection[Any], store: PostgresStore,
                 pipeline: psycopg.Pipeline | None = None) -> None:
        self._connection = connection
        self._store = store
        self._pipeline = pipeline

    def execute(self, sql: str, parameters: Any = (), /) -> Cursor:
        with self._store._errors():
            cursor = self._connection.execute(translate(sql), _parameters(parameters))
            if self._pipeline is not None:
                return _Pending(cursor, self._pipeline, self._store)
            return _Result.of(cursor)

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Cursor:
        with self._store._errors():
            if self._pipeline is not None:  # the cursor lives until its result is read
                cursor = self._connection.cursor()
                cursor.executemany(translate(sql), [_parameters(each) for each in parameters])
                return _Pending(cursor, self._pipeline, self._store)
            with self._connection.cursor() as cursor:
                cursor.executemany(translate(sql), [_parameters(each) for each in parameters])
                return _Result([], cursor.rowcount)


class _Reads:
    """Reads outside a transaction: each statement borrows a pooled connection for as long as it runs."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    def execute(self, sql: str, parameters: Any = (), /) -> Cursor:
        with self._store._errors(), self._store._pool.connection() as connection:
            return _Result.of(connection.execute(translate(sql), _parameters(parameters)))

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Cursor:
        with self._store.write() as db:
            return db.executemany(sql, parameters)


class _Result:
    """A statement's rows, fetched at once (the connection goes back to the pool), and its row count."""

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self._next = 0
        self.rowcount = rowcount

    @classmethod
    def of(cls, cursor: psycopg.Cursor[Any]) -> _Result:
        return cls(cursor.fetchall() if cursor.description is not None else [], cursor.rowcount)

    def fetchone(self) -> Any:
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self) -> list[Any]:
        rows, self._next = self._rows[self._next:], len(self._rows)
        return rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


class _Pending:
    """A statement sent in pipeline mode: the client waits for its result only when it is read."""

    def __init__(self, cursor: psycopg.Cursor[Any], pipeline: psycopg.Pipeline, store: PostgresStore) -> None:
        self._cursor = cursor
        self._pipeline = pipeline
        self._store = store
        self._result: _Result | None = None

    def _fetched(self) -> _Result:
        if self._result is None:
            with self._store._errors():
                self._pipeline.sync()
                self._result = _Result.of(self._cursor)
        return self._result

    @property
    def rowcount(self) -> int:
        return self._fetched().rowcount

    def fetchone(self) -> Any:
        return self._fetched().fetchone()

    def fetchall(self) -> list[Any]:
        return self._fetched().fetchall()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._fetched())


def _check_idle_connection(connection: psycopg.Connection[Any]) -> None:
    """The pool's check before it lends a connection, without a round trip: an idle connection has nothing to
    read unless its server ended it (a restart, an administrator's terminate) or sent a notice; only then is it
    asked (psycopg's own check), and the pool replaces it if that fails. Checking every loan with a query (the
    pool's usual check) cost a round trip each, four per generation."""
    if connection.closed or connection.broken:
        raise psycopg.OperationalError("the connection is closed")
    readable, _, _ = select.select([connection.fileno()], [], [], 0)
    if readable:
        ConnectionPool.check_connection(connection)


_TOKEN = re.compile(r"'(?:[^']|'')*'|\?|(?<!:):([A-Za-z_][A-Za-z0-9_]*)|%")


def translate(sql: str) -> str:
    """SQLite's parameter style (``?``, ``:name``) as psycopg's (``%s``, ``%(name)s``); a literal ``%`` doubled.
    Quoted strings are left as they are; ``::type`` casts are not parameters."""
    def replace(match: re.Match[str]) -> str:
        piece = match.group(0)
        if piece.startswith("'"):
            return piece.replace("%", "%%")  # psycopg reads placeholders everywhere, quotes included
        if piece == "?":
            return "%s"
        if piece == "%":
            return "%%"
        return f"%({match.group(1)})s"

    return _TOKEN.sub(replace, sql)


def _parameters(parameters: Any) -> Any:
    return tuple(parameters) if isinstance(parameters, list) else parameters


_CONNECTION_REFUSALS: tuple[tuple[str, type[psycopg.Error]], ...] = (
    ("too many clients", psycopg.errors.TooManyConnections),
    ("remaining connection slots are reserved", psycopg.errors.TooManyConnections),
    ("the database system is starting up", psycopg.errors.CannotConnectNow),
    ("the database system is shutting down", psycopg.errors.AdminShutdown),
    ("the database system is in recovery mode", psycopg.errors.CannotConnectNow),
    ("password authentication failed", psycopg.errors.InvalidPassword),
    (r'database "[^"]*" does not exist', psycopg.errors.InvalidCatalogName),
)
"""libpq's words for a refused connection (patterns), and the error class whose explanation fits."""


def _checked_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is not None:
        raise StoreError("capability store URL postgresql://…: a password must not be part of it (it would show in "
                         "ps, shell histories and logs): put it in PGPASSFILE (~/.pgpass), PGPASSWORD or a service "
                         "file, and give postgresql://USER@HOST:PORT/DB")
    if not parts.path.strip("/") and "dbname=" not in parts.query:
        raise StoreError(f"capability store {url!r} names no database: postgresql://USER@HOST:PORT/DB")
    return url


def _pool_size_from_environment() -> int:
    text = os.environ.get(POOL_SIZE_VARIABLE, "")
    if not text:
        return DEFAULT_POOL_SIZE
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise StoreError(f"{POOL_SIZE_VARIABLE}={text!r} is invalid: must be a number of connections, 1 to 1000")
    return int(text)


def store_error(error: psycopg.Error, url: str) -> StoreError:
    """What went wrong with the database, in words an operator can act on (PostgreSQL's own words included)."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    for kind, explanation in _EXPLANATIONS:
        if isinstance(error, kind):
            return StoreError(explanation.format(url=url, message=message))
    # A connection refused by the server comes as a plain OperationalError: its words say which case it is.
    for words, kind in _CONNECTION_REFUSALS:
        if re.search(words, message):
            explanation = dict(_EXPLANATIONS)[kind]
            return StoreError(explanation.format(url=url, message=message))
    if isinstance(error, psycopg.OperationalError):
        return StoreError(f"capability store {url} cannot be reached ({message}): nothing was written; check that "
                          "PostgreSQL runs there and accepts this user (the password comes from PGPASSFILE, "
                          "PGPASSWORD or a service file), then retry")
    return StoreError(f"capability store {url}: {message}")


_EXPLANATIONS: tuple[tuple[type[psycopg.Error], str], ...] = (
    (psycopg.errors.AdminShutdown,
     "capability store {url} is shutting down or restarting ({message}): nothing was written; retry in a moment"),
    (psycopg.errors.CannotConnectNow,
     "capability store {url} is starting up or restarting ({message}): nothing was written; retry in a moment"),
    (psycopg.errors.TooManyConnections,
     "capability store {url} has no connection left ({message}): nothing was written; lower "
     f"{POOL_SIZE_VARIABLE} on the hosts, or raise the server's max_connections"),
    (psycopg.errors.QueryCanceled,
     "capability store {url}: a statement ran past its timeout ({message}), e.g. waiting for a lock another "
     "transaction held: nothing was written; retry"),
    (psycopg.errors.LockNotAvailable,
     "capability store {url}: a lock was not granted in time ({message}): nothing was written; retry"),
    (psycopg.errors.InsufficientPrivilege,
     "capability store {url}: this user may not do that ({message}): grant it the rights on the store's tables"),
    (psycopg.errors.InvalidPassword,
     "capability store {url} refused the password ({message}): check PGPASSFILE, PGPASSWORD or the service file"),
    (psycopg.errors.InvalidCatalogName,
     "capability store {url}: the database does not exist ({message}): create it (createdb) or fix the URL"),
    (psycopg.errors.DiskFull,
     "capability store {url}: the database server's disk is full ({message}): nothing was written"),
)

