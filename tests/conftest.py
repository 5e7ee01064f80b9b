"""Fixtures for every test: the capability stores, SQLite and a real PostgreSQL server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from capability.store import STORE_FILE, Store
from workbench.postgres import PostgresServer, postgres_server

STORE_KINDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (about a second to start); every test gets databases of its own."""
    with postgres_server() as server:
        yield server


def new_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Store:
    if kind == "sqlite":
        from capability.sqlite_store import SQLiteStore

        return SQLiteStore(tmp_path / STORE_FILE)
    from capability.postgres_store import PostgresStore

    server: PostgresServer = request.getfixturevalue("postgres")
    return PostgresStore(server.database())


@pytest.fixture(params=STORE_KINDS)
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The test runs once on each store: the guarantees are the same on both."""
    store = new_store(request.param, tmp_path, request)
    yield store
    store.close()


@pytest.fixture(params=STORE_KINDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new, empty store of each kind (for tests that open it themselves, in other processes)."""
    if request.param == "sqlite":
        return f"sqlite://{(tmp_path / STORE_FILE).resolve()}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.database()
