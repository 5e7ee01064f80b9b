"""``python -m capability store migrate``: a SQLite store moved into PostgreSQL keeps every capability, audit entry
(ids and order) and server, refuses a non-empty target unless told, is safe to run twice, and the migrated store
works: the same grants, the same audit, new entries after the old ones."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from capability.capabilities import Capabilities
from capability.errors import DeniedError, UnauthenticatedError
from capability.servers import ServerKeys
from capability.sqlite_store import SQLiteStore
from capability.store import STORE_FILE, Store, open_store
from capability.tokens import Tokens
from workbench.postgres import PostgresServer

SERVER = "http://127.0.0.1:8000"


def migrate(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "capability", "store", "migrate", *arguments, "--json"],
                          capture_output=True, text=True, timeout=120, check=False)


def history(store: Store, key_file: Path) -> dict[str, str]:
    """A store with some life in it: a tree given, delegated, used, partly revoked, and a registered server."""
    capabilities = Capabilities(store)
    authority = capabilities.create_authority("ops").id
    minted = capabilities.mint("ops", authority, {"server_url": SERVER, "default_model": "m", "max_concurrent": 2}).id
    kept = capabilities.delegate("ops", minted, {"max_width": 256}).id
    capabilities.give("ops", kept, "alice")
    dropped = capabilities.delegate("ops", minted, {}).id
    capabilities.revoke("ops", dropped)
    capabilities.release_slot(capabilities.acquire_slot("alice", kept), {
        "entity": "alice", "capability_id": kept, "action": "generate", "outcome": "ok", "model": "m", "width": 64,
        "height": 64, "steps": 2})
    capabilities.acquire_slot("alice", kept)  # a live lease: not migrated
    with pytest.raises(DeniedError):
        capabilities.authorize("mallory", kept)
    ServerKeys(store, None).register("http://gpu:8000", key_file, grpc_address="gpu:8001")
    tokens = Tokens(store)
    token = tokens.issue("ops", "alice", 3600).token
    withdrawn = tokens.issue("ops", "bob", 3600)
    tokens.revoke("ops", withdrawn.described.id)
    return {"authority": authority, "minted": minted, "kept": kept, "dropped": dropped, "token": token,
            "withdrawn": withdrawn.token}


def rows(store: Store, sql: str) -> list[dict[str, Any]]:
    return [dict(row) for row in store.read().execute(sql)]


def sqlite_source(directory: Path) -> tuple[Path, dict[str, str], list[dict[str, Any]]]:
    """A closed SQLite store with :func:`history` in it: its path, the ids, its audit log."""
    path = directory / STORE_FILE
    (directory / "gpu.key").write_text("the-key-of-the-gpu-server-0001\n")
    source = SQLiteStore(path)
    ids = history(source, directory / "gpu.key")
    audit = rows(source, "SELECT * FROM audit ORDER BY id")
    source.close()
    return path, ids, audit


def test_a_sqlite_store_moves_into_postgresql_whole_and_a_second_run_finds_it_done(
    tmp_path: Path, postgres: PostgresServer,
) -> None:
    source_path, ids, audit_before = sqlite_source(tmp_path)
    target_url = postgres.database()
    key_dir = tmp_path / "keys"

    first = migrate("--from", f"sqlite://{source_path}", "--to", target_url, "--key-dir", str(key_dir))
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["copied"] is True
    assert report["counts"] == {"capabilities": 4, "audit": len(audit_before), "servers": 1, "tokens": 2}

    again = migrate("--from", f"sqlite://{source_path}", "--to", target_url, "--key-dir", str(key_dir))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {**report, "copied": False}  # the same digest: nothing to do

    target = open_store(target_url, tmp_path)
    capabilities = Capabilities(target)
    assert rows(target, "SELECT * FROM audit ORDER BY id") == audit_before
    assert rows(target, "SELECT COUNT(*) AS n FROM leases") == [{"n": 0}]
    assert capabilities.authorize("alice", ids["kept"]).params.max_width == 256
    with pytest.raises(DeniedError, match="is revoked"):
        capabilities.authorize("ops", ids["dropped"])
    # The server's key went into a private file; the shared store holds only its path.
    key_file = key_dir / "gpu_8000.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert ServerKeys(target, None).key_for("http://gpu:8000") == "the-key-of-the-gpu-server-0001"
    assert "the-key-of-the-gpu-server-0001" not in json.dumps(rows(target, "SELECT * FROM servers"))
    # The service's tokens moved as digests: the one issued still opens, the revoked one still does not.
    assert Tokens(target).authenticate(ids["token"]) == "alice"
    with pytest.raises(UnauthenticatedError, match="is revoked"):
        Tokens(target).authenticate(ids["withdrawn"])
    assert ids["token"] not in json.dumps(rows(target, "SELECT * FROM tokens"))
    # New entries follow the copied ones (the denial above was one).
    capabilities.record("ops", ids["minted"], "generate", "ok", detail="after the move")
    after = rows(target, "SELECT id, detail FROM audit ORDER BY id")
    assert after[-1]["detail"] == "after the move"
    assert [row["id"] for row in after[:len(audit_before)]] == [row["id"] for row in audit_before]
    assert after[-1]["id"] == audit_before[-1]["id"] + 2
    target.close()


def test_a_non_empty_target_is_refused_unless_forced_and_keys_need_a_directory(
    tmp_path: Path, postgres: PostgresServer,
) -> None:
    source_path, _, _ = sqlite_source(tmp_path)
    target_url = postgres.database()

    no_keys = migrate("--from", f"sqlite://{source_path}", "--to", target_url)
    assert no_keys.returncode == 1
    assert "give --key-dir DIR" in no_keys.stderr
    assert "the-key-of-the-gpu-server-0001" not in no_keys.stderr + no_keys.stdout

    other = open_store(target_url, tmp_path)
    Capabilities(other).create_authority("someone-else")
    other.close()
    refused = migrate("--from", f"sqlite://{source_path}", "--to", target_url, "--key-dir", str(tmp_path / "keys"))
    assert refused.returncode == 1
    assert "is not empty (1 capabilities)" in refused.stderr
    assert "give --force" in refused.stderr
    forced = migrate("--from", f"sqlite://{source_path}", "--to", target_url, "--key-dir", str(tmp_path / "keys"),
                     "--force")
    assert forced.returncode == 0, forced.stderr
    target = open_store(target_url, tmp_path)
    assert [row["owner"] for row in rows(target, "SELECT owner FROM capabilities WHERE type = 'sys.mint'")] == ["ops"]
    target.close()
