"""One capability state for many hosts, end to end: two application hosts (processes with state dirs of their
own, sharing nothing but the PostgreSQL database and the server's key file, as a mounted Secret would be), one
PostgreSQL server, one tritonserver with the tiny models.

A capability minted on one host is used on the other; a ``max_concurrent: 2`` tree is never above two slots in
total while both hosts' threads press on it, and both hosts get slots; a revocation on one host refuses the other's
next use; the audit log holds every use of both."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from capability import CapabilityLayer, ConcurrencyLimitError, DeniedError
from capability.servers import ServerKeys
from inference_client.state import INFER_KEY_FILE
from triton_launcher.server import TritonServer
from workbench.postgres import PostgresServer

SPAWN = multiprocessing.get_context("spawn")
THREADS_PER_HOST = 3
GENERATIONS_PER_THREAD = 2
OPTIONS = {"width": 128, "height": 128, "numInferenceSteps": 12, "modelId": "tiny-sd15"}
"""Long enough (a few hundred milliseconds) for the threads' generations to overlap."""
DEADLINE_S = 300.0


def _host(store_url: str, state_dir: str, entity: str, capability_id: str, results: Any) -> None:
    """One application host: its threads generate until each has had its images, retrying when refused for the
    budget; it reports how many it made and how often it was refused."""
    made, refused = [0], [0]
    lock = threading.Lock()
    with CapabilityLayer(Path(state_dir), store=store_url) as layer:
        handle = layer.handle(entity, capability_id)

        def generate(thread: int) -> None:
            deadline = time.monotonic() + DEADLINE_S
            done = 0
            while done < GENERATIONS_PER_THREAD and time.monotonic() < deadline:
                try:
                    handle.text_to_image(f"a red cube, {entity} {thread}", {**OPTIONS, "seed": thread})
                except ConcurrencyLimitError:
                    with lock:
                        refused[0] += 1
                    time.sleep(0.02)  # the budget is full: try again shortly, as a polite client does
                    continue
                done += 1
                with lock:
                    made[0] += 1

        threads = [threading.Thread(target=generate, args=(thread,)) for thread in range(THREADS_PER_HOST)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    results.put((entity, made[0], refused[0]))


def test_two_hosts_share_one_state_budgets_revocation_and_audit(
    postgres: PostgresServer, tiny_server: TritonServer, tmp_path: Path,
) -> None:
    store_url = postgres.database()
    key_file = tiny_server.options.state_dir / INFER_KEY_FILE
    hosts = {name: tmp_path / name for name in ("host-a", "host-b")}
    for state_dir in hosts.values():
        state_dir.mkdir(mode=0o700)

    # Host A mints and registers the server; host B only ever sees the shared database.
    with CapabilityLayer(hosts["host-a"], store=store_url) as host_a:
        ServerKeys(host_a.store, hosts["host-a"]).register(tiny_server.url, key_file)
        authority = host_a.create_authority("ops")
        root = host_a.mint("ops", authority.id, {"server_url": tiny_server.url, "default_model": "tiny-sd15",
                                                  "max_concurrent": 2})
        for_alice = root.delegate({"max_width": 256}).give("alice")
        for_bob = root.delegate({"max_width": 256}).give("bob")

        with CapabilityLayer(hosts["host-b"], store=store_url) as host_b:
            first = host_b.handle("alice", for_alice.id).text_to_image("a blue ball", {**OPTIONS, "seed": 1})
            assert (first["width"], first["model"]) == (128, "tiny-sd15")

        # Both hosts press on the one budget of two at once; the database says how many slots are taken.
        results = SPAWN.Queue()
        processes = [SPAWN.Process(target=_host, args=(store_url, str(hosts[host]), entity, capability, results))
                     for host, entity, capability in (("host-a", "alice", for_alice.id), ("host-b", "bob", for_bob.id))]
        for process in processes:
            process.start()
        most_in_use = 0
        while any(process.is_alive() for process in processes):
            in_use = host_a.store.read().execute(
                "SELECT COUNT(*) AS n FROM lease_budgets WHERE capability_id = ?", (root.id,)).fetchone()["n"]
            most_in_use = max(most_in_use, int(in_use))
            time.sleep(0.01)
        outcomes = {entity: (made, refused) for entity, made, refused in (results.get(timeout=60) for _ in processes)}
        assert [process.exitcode for process in processes] == [0, 0]

        expected = THREADS_PER_HOST * GENERATIONS_PER_THREAD
        assert outcomes["alice"][0] == outcomes["bob"][0] == expected  # both hosts got slots
        assert most_in_use == 2  # the budget was used to the full, and never beyond
        assert outcomes["alice"][1] + outcomes["bob"][1] > 0  # and it did bind: threads were refused

        # A revocation on host A refuses host B's next use at once.
        host_a.handle("ops", root.id).revoke()
        with CapabilityLayer(hosts["host-b"], store=store_url) as host_b, \
                pytest.raises(DeniedError, match="is revoked"):
            host_b.handle("bob", for_bob.id).text_to_image("a green cone", {**OPTIONS, "seed": 2})

        # Every use of both hosts is in the one audit log: images, refusals for the budget, the revoked use.
        audit = host_a.capabilities.audit_entries("ops", action="generate")
        by_entity = {entity: [entry["outcome"] for entry in audit if entry["entity"] == entity]
                     for entity in ("alice", "bob")}
        assert by_entity["alice"].count("ok") == expected + 1
        assert by_entity["bob"].count("ok") == expected
        assert by_entity["alice"].count("denied") + by_entity["bob"].count("denied") == (
            outcomes["alice"][1] + outcomes["bob"][1] + 1)
        assert host_a.store.read().execute("SELECT COUNT(*) AS n FROM leases").fetchone()["n"] == 0
