"""The capability store: one interface, two implementations, chosen by a URL.

- ``sqlite:///PATH`` (``sqlite://`` and an absolute path; the default is ``capabilities.sqlite3`` in the
  launcher's state dir): the embedded store of one host (:mod:`.sqlite_store`);
- ``postgresql://USER@HOST:PORT/DB``: one state for every host, so that budgets, revocations and the audit log
  hold across all of them (:mod:`.postgres_store`).

The URL comes from ``--store`` (the CLI), ``store=`` (the Python API) or the environment variable
``CAPABILITY_STORE``, in that order. A PostgreSQL password never goes in it: libpq's own places hold it
(``PGPASSFILE``, ``PGPASSWORD``, a service file).

SQL is written once, in SQLite's parameter style (``?`` and ``:name``); the PostgreSQL store translates it.
Rows are read by column name (``row["id"]``, ``dict(row)``), never by position.
"""

from __future__ import annotations

import abc
import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from .errors import StoreError

STORE_FILE = "capabilities.sqlite3"
"""File name of the SQLite store inside the launcher's state dir."""
STORE_VARIABLE = "CAPABILITY_STORE"
"""The environment variable that chooses the store (containers), when no URL is given."""


class Cursor(Protocol):
    """What a statement returns: its rows, by column name, and how many rows it changed."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Db(Protocol):
    """A connection for one transaction (:meth:`Store.write`) or for reads (:meth:`Store.read`)."""

    def execute(self, sql: str, parameters: Any = (), /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Cursor: ...


class Store(abc.ABC):
    """Where capabilities, leases, the audit log and known servers live."""

    url: str
    """Where the store is, for messages: never a password."""
    dialect: str
    """``sqlite`` or ``postgresql``: for the few statements that cannot be written once for both."""
    stores_secrets: bool = True
    """Whether server keys may be kept in the store itself; where not, only the path of a key file each host
    reads is (:class:`~capability.servers.ServerKeys`)."""

    @abc.abstractmethod
    def write(self) -> contextlib.AbstractContextManager[Db]:
        """A write transaction: all of it commits, or (on any exception, or a crash) none of it."""

    @abc.abstractmethod
    def read(self) -> Db:
        """A connection for reads; each statement sees the last committed state."""

    @abc.abstractmethod
    def now(self, db: Db) -> float:
        """The store's clock, in seconds since the epoch. Expiry of leases and capabilities is judged by it, so on
        a store shared by several hosts it is the database server's, and a host whose clock is off can neither
        extend nor steal a budget."""

    clock_sql: str | None = None
    """The store's clock (:meth:`now`) as an SQL expression, where it has one: a statement that needs the time then
    reads it itself instead of asking for it in a round trip of its own. None where the clock is the host's."""

    row_lock: str = ""
    """What :meth:`capability_chain` appends to lock the rows it reads: nothing where write transactions already
    run one at a time (SQLite)."""

    def capability_chain(self, db: Db, capability_id: str, max_depth: int, *, lock: bool = False) -> list[Any]:
        """The rows of the capability and of its ancestors (at most ``max_depth`` up), root first, in one statement.

        With ``lock``, held until the transaction ends, taken root first by every caller, so that two writers never
        wait for each other in a circle: slots of one tree are then taken one at a time on every host, and a
        revocation or a give either commits before the check that follows (which sees it) or waits until the slot
        is taken. (PostgreSQL sorts before it locks, so the ORDER BY is the order of the locks.)"""
        sql = _CHAIN_QUERY + (self.row_lock if lock else "")
        return db.execute(sql, {"id": capability_id, "max_depth": max_depth}).fetchall()

    @abc.abstractmethod
    def close(self) -> None:
        """Release this thread's connection (SQLite) or the pool (PostgreSQL)."""


_CHAIN_QUERY = """
    WITH RECURSIVE chain(id, parent_id, depth) AS (
        SELECT id, parent_id, 0 FROM capabilities WHERE id = :id
        UNION ALL SELECT c.id, c.parent_id, chain.depth + 1
        FROM capabilities c JOIN chain ON c.id = chain.parent_id WHERE chain.depth < :max_depth)
    SELECT c.* FROM capabilities c JOIN chain ON c.id = chain.id ORDER BY chain.depth DESC"""


def store_url(location: str | None, state_dir: Path) -> str:
    """The store to use: ``location`` if given, else ``$CAPABILITY_STORE``, else the SQLite file in ``state_dir``."""
    chosen = location or os.environ.get(STORE_VARIABLE) or ""
    return chosen.strip() or f"sqlite://{(state_dir / STORE_FILE).resolve()}"


def open_store(location: str | None, state_dir: Path) -> Store:
    """The store ``location`` names (see :func:`store_url`), opened: created and migrated if need be."""
    url = store_url(location, state_dir)
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from .sqlite_store import SQLiteStore

        return SQLiteStore(sqlite_path(url))
    if scheme in ("postgresql", "postgres"):
        from .postgres_store import PostgresStore

        return PostgresStore(url)
    raise StoreError(f"capability store {redacted(url)!r} is not one this layer knows: use sqlite:///PATH or "
                     "postgresql://USER@HOST:PORT/DB (the password from PGPASSFILE, PGPASSWORD or a service file)")


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///PATH`` URL: ``sqlite://`` and an absolute path."""
    parts = urlsplit(url)
    if parts.netloc or not parts.path.startswith("/") or parts.path.startswith("//") or parts.query or parts.fragment:
        raise StoreError(f"capability store {url!r} is invalid: a SQLite store is sqlite:// and an absolute path, "
                         "e.g. sqlite:///var/lib/triton-diffusers/capabilities.sqlite3")
    return Path(parts.path)


def redacted(url: str) -> str:
    """``url`` without a password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}@" if parts.username else ""
    return parts._replace(netloc=user + netloc).geturl()
