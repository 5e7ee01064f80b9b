"""Each store across processes (for PostgreSQL, as if on separate hosts: nothing shared but the database): a shared
concurrency budget, concurrent writers, a writer killed mid-write."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any

from capability.capabilities import Capabilities
from capability.errors import ConcurrencyLimitError
from capability.store import Store, open_store

SPAWN = multiprocessing.get_context("spawn")
SERVER = "http://127.0.0.1:8000"


def opened(url: str) -> Store:
    return open_store(url, Path("/nonexistent"))  # the URL says where; no state dir is needed


def count(store: Store, sql: str) -> int:
    return int(store.read().execute(sql).fetchone()["n"])


def _contend(url: str, capability_id: str, attempted: Any, results: Any) -> None:
    capabilities = Capabilities(opened(url))
    try:
        lease: str | None = capabilities.acquire_slot("admin", capability_id)
        results.put("acquired")
    except ConcurrencyLimitError:
        lease = None
        results.put("refused")
    attempted.wait()  # hold the slot until every process has tried
    if lease is not None:
        capabilities.release_slot(lease)


def test_max_concurrent_is_never_exceeded_when_processes_use_a_capability_and_its_children(store_url: str) -> None:
    capabilities = Capabilities(opened(store_url))
    authority = capabilities.create_authority("admin").id
    parent = capabilities.mint("admin", authority, {"server_url": SERVER, "default_model": "m",
                                                    "max_concurrent": 3}).id
    children = [capabilities.delegate("admin", parent, {"max_concurrent": 3}).id for _ in range(2)]
    targets = [parent, *children] * 2  # six processes on one budget of three
    attempted = SPAWN.Barrier(len(targets))
    results = SPAWN.Queue()
    processes = [SPAWN.Process(target=_contend, args=(store_url, target, attempted, results)) for target in targets]
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=120)
    assert outcomes == ["acquired"] * 3 + ["refused"] * 3
    assert all(process.exitcode == 0 for process in processes)
    assert count(capabilities.store, "SELECT COUNT(*) AS n FROM leases") == 0


def _mint_many(url: str, authority: str, how_many: int) -> None:
    capabilities = Capabilities(opened(url))
    for _ in range(how_many):
        capabilities.mint("admin", authority, {"server_url": SERVER, "default_model": "m"})


def test_concurrent_writers_lose_nothing_when_four_processes_mint_at_once(store_url: str) -> None:
    authority = Capabilities(opened(store_url)).create_authority("admin").id
    processes = [SPAWN.Process(target=_mint_many, args=(store_url, authority, 25)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0] * 4
    assert count(opened(store_url), "SELECT COUNT(*) AS n FROM capabilities WHERE type = 'diffusers.generate'") == 100


def _killed_mid_write(url: str) -> None:
    store = opened(url)
    with store.write() as db:
        db.execute("UPDATE capabilities SET owner = 'mallory'")
        db.execute("DELETE FROM audit")
        os.kill(os.getpid(), signal.SIGKILL)  # dies holding an uncommitted transaction


def test_store_keeps_the_last_committed_state_when_a_writer_is_killed_mid_write(store_url: str) -> None:
    capabilities = Capabilities(opened(store_url))
    authority = capabilities.create_authority("admin").id
    capability = capabilities.mint("admin", authority, {"server_url": SERVER, "default_model": "m"}).id
    capabilities.store.close()

    process = SPAWN.Process(target=_killed_mid_write, args=(store_url,))
    process.start()
    process.join(timeout=120)
    assert process.exitcode == -signal.SIGKILL

    reopened = Capabilities(opened(store_url))
    if store_url.startswith("sqlite:"):
        assert reopened.store.read().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert reopened.show("admin", capability).owner == "admin"
    assert len(reopened.audit_log("admin", capability)) == 1
    # And the store still takes writes: no lock was left behind (PostgreSQL ended the dead client's session).
    assert reopened.delegate("admin", capability, {}).owner == "admin"
    assert count(reopened.store, "SELECT COUNT(*) AS n FROM capabilities") == 3
