"""The store across processes: a shared concurrency budget, concurrent writers, a writer killed mid-write."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

from capability.capabilities import Capabilities
from capability.errors import ConcurrencyLimitError
from capability.store import STORE_FILE, Store

SPAWN = multiprocessing.get_context("spawn")
SERVER = "http://127.0.0.1:8000"


def _contend(path: Path, capability_id: str, attempted: Any, results: Any) -> None:
    capabilities = Capabilities(Store(path))
    try:
        lease: str | None = capabilities.acquire_slot("admin", capability_id)
        results.put("acquired")
    except ConcurrencyLimitError:
        lease = None
        results.put("refused")
    attempted.wait()  # hold the slot until every process has tried
    if lease is not None:
        capabilities.release_slot(lease)


def test_max_concurrent_is_never_exceeded_when_processes_use_a_capability_and_its_children(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    capabilities = Capabilities(Store(path))
    authority = capabilities.create_authority("admin").id
    parent = capabilities.mint("admin", authority, {"server_url": SERVER, "default_model": "m",
                                                    "max_concurrent": 3}).id
    children = [capabilities.delegate("admin", parent, {"max_concurrent": 3}).id for _ in range(2)]
    targets = [parent, *children] * 2  # six processes on one budget of three
    attempted = SPAWN.Barrier(len(targets))
    results = SPAWN.Queue()
    processes = [SPAWN.Process(target=_contend, args=(path, target, attempted, results)) for target in targets]
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=120)
    assert outcomes == ["acquired"] * 3 + ["refused"] * 3
    assert all(process.exitcode == 0 for process in processes)
    assert capabilities.store.read().execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 0


def _mint_many(path: Path, authority: str, count: int) -> None:
    capabilities = Capabilities(Store(path))
    for _ in range(count):
        capabilities.mint("admin", authority, {"server_url": SERVER, "default_model": "m"})


def test_concurrent_writers_lose_nothing_when_four_processes_mint_at_once(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    authority = Capabilities(Store(path)).create_authority("admin").id
    processes = [SPAWN.Process(target=_mint_many, args=(path, authority, 25)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0] * 4
    count = Store(path).read().execute("SELECT COUNT(*) FROM capabilities WHERE type = 'diffusers.generate'")
    assert count.fetchone()[0] == 100


def _killed_mid_write(path: Path) -> None:
    store = Store(path)
    with store.write() as db:
        db.execute("UPDATE capabilities SET owner = 'mallory'")
        db.execute("DELETE FROM audit")
        os.kill(os.getpid(), signal.SIGKILL)  # dies holding an uncommitted transaction


def test_store_keeps_the_last_committed_state_when_a_writer_is_killed_mid_write(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    capabilities = Capabilities(Store(path))
    authority = capabilities.create_authority("admin").id
    capability = capabilities.mint("admin", authority, {"server_url": SERVER, "default_model": "m"}).id
    capabilities.store.close()

    process = SPAWN.Process(target=_killed_mid_write, args=(path,))
    process.start()
    process.join(timeout=120)
    assert process.exitcode == -signal.SIGKILL

    reopened = Capabilities(Store(path))
    assert reopened.store.read().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert reopened.show("admin", capability).owner == "admin"
    assert len(reopened.audit_log("admin", capability)) == 1
    # And the store still takes writes: no lock was left behind.
    assert reopened.delegate("admin", capability, {}).owner == "admin"
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT COUNT(*) FROM capabilities").fetchone()[0] == 3
