"""Choosing the store by URL (``--store``, ``store=``, ``$CAPABILITY_STORE``), and what a user sees when it is
wrong or the database is not there: a StoreError naming the store, never a password, and the fix."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from capability import CapabilityLayer, postgres_store
from capability.errors import StoreError
from capability.postgres_store import PostgresStore
from capability.store import STORE_FILE, STORE_VARIABLE, open_store, store_url
from triton_launcher.server import free_port
from workbench.postgres import PostgresServer, postgres_server


def test_an_explicit_url_wins_over_the_environment_which_wins_over_the_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(STORE_VARIABLE, raising=False)
    assert store_url(None, tmp_path) == f"sqlite://{(tmp_path / STORE_FILE).resolve()}"
    monkeypatch.setenv(STORE_VARIABLE, "postgresql://app@db:5432/capabilities")
    assert store_url(None, tmp_path) == "postgresql://app@db:5432/capabilities"
    assert store_url("sqlite:///srv/store.sqlite3", tmp_path) == "sqlite:///srv/store.sqlite3"


@pytest.mark.parametrize(("url", "rule"), [
    ("mysql://app@db/capabilities", "is not one this layer knows"),
    ("sqlite://relative/store.sqlite3", "sqlite:// and an absolute path"),
    ("postgresql://app:s3cret@127.0.0.1:5432/capabilities", "a password must not be part of it"),
    ("postgresql://app@127.0.0.1:5432", "names no database"),
])
def test_a_bad_store_url_is_refused_naming_the_rule_and_never_the_password(
    tmp_path: Path, url: str, rule: str,
) -> None:
    with pytest.raises(StoreError, match=rule) as refused:
        open_store(url, tmp_path)
    assert "s3cret" not in str(refused.value)


def test_the_cli_and_the_python_api_use_the_store_the_url_names(store_url: str, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"  # holds no store: the URL says where it is
    state_dir.mkdir(mode=0o700)

    def cli(*arguments: str, environment: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "capability", *arguments, "--state-dir", str(state_dir)],
                              capture_output=True, text=True, timeout=120, check=False,
                              env={**os.environ, **(environment or {})})

    created = cli("init", "--admin", "ops", "--store", store_url, "--json")
    assert created.returncode == 0, created.stderr
    authority = json.loads(created.stdout)["id"]
    listed = cli("list", "--as", "ops", "--json", environment={STORE_VARIABLE: store_url})
    assert listed.returncode == 0, listed.stderr
    assert [item["id"] for item in json.loads(listed.stdout)] == [authority]
    with CapabilityLayer(state_dir, store=store_url) as layer:
        assert [item.id for item in layer.capabilities.owned("ops")] == [authority]
    assert not (state_dir / STORE_FILE).exists()


def test_a_database_that_is_not_there_is_a_store_error_naming_it_and_what_to_do(tmp_path: Path) -> None:
    url = f"postgresql://capability@127.0.0.1:{free_port()}/capabilities"  # nothing listens there
    with pytest.raises(StoreError, match=r"capability store postgresql://capability@127\.0\.0\.1:\d+/capabilities"
                                         r" cannot be reached .*check that PostgreSQL runs there"):
        PostgresStore(url)
    refused = subprocess.run([sys.executable, "-m", "capability", "list", "--as", "ops", "--store", url],
                             capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 1
    assert refused.stderr.startswith("refused: capability store postgresql://capability@127.0.0.1")
    assert "Traceback" not in refused.stderr


def test_a_schema_newer_than_the_code_is_refused_and_left_as_it_is(postgres: PostgresServer) -> None:
    url = postgres.database()
    PostgresStore(url).close()
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("UPDATE capability_schema SET version = 99")
    newer = f"schema version 99, newer than this code's {postgres_store.SCHEMA_VERSION}: upgrade"
    with pytest.raises(StoreError, match=newer):
        PostgresStore(url)
    with psycopg.connect(url, autocommit=True) as connection:
        assert connection.execute("SELECT version FROM capability_schema").fetchone() == (99,)


def test_someone_elses_tables_of_the_same_name_are_not_adopted(postgres: PostgresServer) -> None:
    url = postgres.database()
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("CREATE TABLE audit (line TEXT)")
    with pytest.raises(StoreError, match="not a capability store's, and were left unchanged"):
        PostgresStore(url)


def test_a_statement_that_waits_past_its_timeout_for_a_lock_is_a_store_error_and_writes_nothing(
    postgres: PostgresServer,
) -> None:
    url = postgres.database()
    store = PostgresStore(url, statement_timeout_ms=500)
    from capability.capabilities import Capabilities

    capabilities = Capabilities(store)
    authority = capabilities.create_authority("ops").id
    with psycopg.connect(url) as holder:  # another client holds the authority's row
        holder.execute("SELECT * FROM capabilities WHERE id = %s FOR UPDATE", (authority,))
        with pytest.raises(StoreError, match=r"timeout|lock was not granted in time"):
            capabilities.revoke("ops", authority)
    assert capabilities.show("ops", authority).revoked_at is None
    store.close()


def test_a_database_out_of_connections_is_a_store_error_that_says_what_to_change() -> None:
    with postgres_server(max_connections=5) as server:
        url = server.database()
        # PostgreSQL keeps some of its slots for superusers (the tests' user is one): hold every slot there is.
        held = []
        with contextlib.ExitStack() as stack:
            while True:
                try:
                    held.append(stack.enter_context(psycopg.connect(url)))
                except psycopg.OperationalError:  # "sorry, too many clients already"
                    break
            assert held, "no connection could be opened at all"
            with pytest.raises(StoreError, match=r"has no connection left .* lower CAPABILITY_STORE_POOL_SIZE"):
                PostgresStore(url)
        store = PostgresStore(url)  # the slots are free again: it opens
        store.close()
