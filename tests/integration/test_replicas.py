"""Many replicas behind one URL, as the Helm chart deploys them, on this machine: two launchers with the tiny
models and one operator key, the chart's own HAProxy (Debian's package, the ConfigMap's haproxy.cfg rendered by
Helm's engine), the PostgreSQL store, and two capability hosts (processes with state dirs of their own).

Requests spread over both replicas, each request on its own (not each connection); budgets hold in total; a
progress stream goes through the proxy's gRPC side; a replica stopped with SIGTERM drains (what it runs
finishes, nothing new reaches it); a replica killed under load costs no request."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from capability import CapabilityHandle, CapabilityLayer, ConcurrencyLimitError
from capability.servers import ServerKeys
from inference_client.contract import Progress
from triton_launcher.repository import build_tiny_repository
from workbench.haproxy import haproxy_binary
from workbench.postgres import PostgresServer

pytest.importorskip("helm_python", reason="the chart is rendered by Helm's engine, a [dev] tool")
if haproxy_binary() is None:
    pytest.skip("no haproxy: scripts/test installs Debian's haproxy package", allow_module_level=True)

from workbench.replicas import GRPC_BACKEND, HTTP_BACKEND, LocalCluster
from workbench.waiting import wait_until

from .conftest import assert_same_image, png_pixels

MODEL = "tiny-sd15"
SPAWN = multiprocessing.get_context("spawn")
QUICK = {"width": 64, "height": 64, "numInferenceSteps": 2, "modelId": MODEL}
LONG = {"width": 256, "height": 256, "numInferenceSteps": 16, "modelId": MODEL}
"""About a second here: long enough to be in flight when a replica is stopped or killed."""
DRAIN_S = 3.0
DEADLINE_S = 300.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    scratch = tmp_path_factory.mktemp("replicas")
    repository = build_tiny_repository(scratch / "repository", families=("sd15",), streaming=("sd15",))
    with LocalCluster(repository, scratch / "cluster", replicas=2, drain_seconds=DRAIN_S) as local:
        yield local


@pytest.fixture(scope="module")
def store_url(postgres: PostgresServer, cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The shared store, with the proxy registered as the server (its URL, its gRPC side, the one key file)."""
    url = postgres.database()
    with CapabilityLayer(tmp_path_factory.mktemp("registrar"), store=url) as layer:
        ServerKeys(layer.store, None).register(cluster.url, cluster.key_file, grpc_address=cluster.grpc_address)
    return url


@pytest.fixture
def hosts(tmp_path: Path) -> dict[str, Path]:
    """Two application hosts' state dirs: nothing shared but the database and the key file."""
    directories = {name: tmp_path / name for name in ("host-a", "host-b")}
    for directory in directories.values():
        directory.mkdir(mode=0o700)
    return directories


def mint(layer: CapabilityLayer, cluster: LocalCluster, admin: str, **limits: Any) -> CapabilityHandle:
    """A tree of its own for each test (its admin reads that tree's audit alone; the store is the module's)."""
    authority = layer.create_authority(admin)
    return layer.mint(admin, authority.id, {"server_url": cluster.url, "default_model": MODEL, **limits})


def _host(store_url: str, state_dir: str, entity: str, capability_id: str, threads: int,  # noqa: PLR0917
          per_thread: int, options: dict[str, Any], first_seed: int, results: Any) -> None:
    """One application host: ``threads`` threads make ``per_thread`` seeded images each, retrying when the
    budget is full; it reports every outcome (``ok`` or the error) and how often it was refused for the budget."""
    outcomes: list[str] = []
    refused = [0]
    lock = threading.Lock()
    with CapabilityLayer(Path(state_dir), store=store_url) as layer:
        handle = layer.handle(entity, capability_id)

        def generate(thread: int) -> None:
            deadline = time.monotonic() + DEADLINE_S
            for index in range(per_thread):
                seed = first_seed + thread * per_thread + index
                while time.monotonic() < deadline:
                    try:
                        handle.text_to_image(f"a red cube, {entity}", {**options, "seed": seed})
                        outcome = "ok"
                    except ConcurrencyLimitError:
                        with lock:
                            refused[0] += 1
                        time.sleep(0.02)  # the budget is full: try again shortly, as a polite client does
                        continue
                    except Exception as error:  # what the application would see; the test asserts there is none
                        outcome = f"{type(error).__name__}: {error}"
                    with lock:
                        outcomes.append(outcome)
                    break

        workers = [threading.Thread(target=generate, args=(thread,)) for thread in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    results.put((entity, outcomes, refused[0]))


def run_hosts(store_url: str, hosts: dict[str, Path], work: dict[str, tuple[str, str]], *, threads: int,
              per_thread: int, options: dict[str, Any], while_running: Any = None) -> dict[str, tuple[list[str], int]]:
    """Run one ``_host`` process per host (``work``: host -> (entity, capability id)); ``while_running()`` is
    called in a loop until they end. Outcomes and budget refusals per entity."""
    results = SPAWN.Queue()
    processes = [SPAWN.Process(target=_host, args=(store_url, str(hosts[host]), entity, capability, threads,
                                                   per_thread, options, 1000 * number, results))
                 for number, (host, (entity, capability)) in enumerate(work.items())]
    for process in processes:
        process.start()
    deadline = time.monotonic() + DEADLINE_S
    while any(process.is_alive() for process in processes) and time.monotonic() < deadline:
        if while_running is not None:
            while_running()
        time.sleep(0.02)
    collected = {entity: (outcomes, refused) for entity, outcomes, refused
                 in (results.get(timeout=60) for _ in processes)}
    for process in processes:
        process.join(60)
    assert [process.exitcode for process in processes] == [0] * len(processes)
    return collected


def sent(cluster: LocalCluster, backend: str = HTTP_BACKEND) -> list[int]:
    return [cluster.requests_sent(replica, backend) for replica in cluster.replicas]


def test_the_proxy_checks_every_replica_by_real_inference_and_asks_its_agent(cluster: LocalCluster) -> None:
    for backend in (HTTP_BACKEND, GRPC_BACKEND):
        for name, server in cluster.proxy.servers(backend).items():
            # L7OK: the check's inference answered 200; the agent answered "ready up".
            assert (server["status"], server["check_status"], server["check_code"]) == ("UP", "L7OK", "200"), name
            assert server["agent_status"] == "L7OK", name


def test_requests_spread_over_both_replicas_and_budgets_hold_in_total(
    cluster: LocalCluster, store_url: str, hosts: dict[str, Path],
) -> None:
    with CapabilityLayer(hosts["host-a"], store=store_url) as layer:
        root = mint(layer, cluster, "ops-spread", max_concurrent=2)
        for_alice = root.delegate({}).give("alice")
        for_bob = root.delegate({}).give("bob")
        logged = len(cluster.proxy.requests())
        before_run = [replica.inference_count(MODEL) for replica in cluster.replicas]
        most_in_use = [0]

        def watch_the_budget() -> None:
            in_use = layer.store.read().execute(
                "SELECT COUNT(*) AS n FROM lease_budgets WHERE capability_id = ?", (root.id,)).fetchone()["n"]
            most_in_use[0] = max(most_in_use[0], int(in_use))

        outcomes = run_hosts(store_url, hosts, {"host-a": ("alice", for_alice.id), "host-b": ("bob", for_bob.id)},
                             threads=3, per_thread=3, options=QUICK, while_running=watch_the_budget)
        assert all(outcome == "ok" for made, _ in outcomes.values() for outcome in made), outcomes
        assert [len(made) for made, _ in outcomes.values()] == [9, 9]

        # Every generation went through the proxy, one by one over both replicas, which both ran them (their
        # own counts hold the proxy's health checks too, which are inferences as well).
        inferences = [request for request in cluster.proxy.requests()[logged:]
                      if request.path == f"/v2/models/{MODEL}/infer"]
        assert [request.status for request in inferences] == ["200"] * 18
        per_replica = [sum(request.server == cluster.server(replica) for request in inferences)
                       for replica in cluster.replicas]
        assert all(count > 0 for count in per_replica), per_replica
        ran = [replica.inference_count(MODEL) - earlier
               for replica, earlier in zip(cluster.replicas, before_run, strict=True)]
        assert all(count_ran >= count for count_ran, count in zip(ran, per_replica, strict=True)), (ran, per_replica)
        # Two slots in total across both hosts and replicas: the shared database never held more.
        assert most_in_use[0] == 2
        assert sum(refused for _, refused in outcomes.values()) > 0, "the budget bound"
        audit = layer.capabilities.audit_entries("ops-spread", action="generate")
        assert [entry["outcome"] for entry in audit].count("ok") == 18


def test_progress_streams_through_the_proxys_grpc_side(cluster: LocalCluster, store_url: str,
                                                       hosts: dict[str, Path]) -> None:
    with CapabilityLayer(hosts["host-a"], store=store_url) as layer:
        handle = mint(layer, cluster, "ops-stream")
        logged = len(cluster.proxy.requests())
        progress: list[Progress] = []
        streamed = handle.text_to_image("a blue ball", {**QUICK, "numInferenceSteps": 4, "seed": 5},
                                        on_progress=progress.append)
        plain = handle.text_to_image("a blue ball", {**QUICK, "numInferenceSteps": 4, "seed": 5})
    total = progress[-1].steps  # the scheduler's passes: SD1.5's PNDM makes one more than asked
    assert [report.steps_done for report in progress] == list(range(1, total + 1))
    assert total >= 4
    # The streaming variant on one replica, the plain one on any, each maybe beside the proxy's inference health
    # check on another instance: the same image within one uint8 step (docs/contract.md#reproducibility).
    assert_same_image(png_pixels(streamed["image"]), png_pixels(plain["image"]))
    streams = [request for request in cluster.proxy.requests()[logged:] if request.backend == GRPC_BACKEND]
    # One bidirectional stream (HTTP/2 requests are logged with their authority).
    assert len(streams) == 1
    assert streams[0].path.endswith("/inference.GRPCInferenceService/ModelStreamInfer")
    assert streams[0].status == "200"


def test_a_replica_stopped_with_sigterm_drains_and_nothing_new_reaches_it(
    cluster: LocalCluster, store_url: str, hosts: dict[str, Path],
) -> None:
    leaving = cluster.replicas[0]
    server = cluster.server(leaving)
    with CapabilityLayer(hosts["host-a"], store=store_url) as layer:
        handle = mint(layer, cluster, "ops-drain")
        # Streams (progress over gRPC) in flight on both replicas when the stop comes.
        in_flight = [handle.start_text_to_image("a lighthouse", {**LONG, "seed": seed}) for seed in range(4)]
        wait_until(lambda: int(cluster.proxy.servers(GRPC_BACKEND)[server]["scur"]) >= 1, 60,
                   "a generation in flight on the replica to stop")
        stopped_at = time.monotonic()
        leaving.terminate()
        cluster.wait_for_status(leaving, "DRAIN", timeout_s=30)
        sent_when_draining = [cluster.requests_sent(leaving, backend) for backend in (HTTP_BACKEND, GRPC_BACKEND)]
        during = [handle.text_to_image("a small boat", {**QUICK, "seed": 100 + seed}) for seed in range(4)]
        during += [handle.text_to_image("a small boat", {**QUICK, "seed": 200 + seed}, on_progress=lambda _: None)
                   for seed in range(2)]
        results = [generation.result() for generation in in_flight]
        assert leaving.wait(timeout_s=120) == 0, leaving.log()  # stopped in order: nothing was cut
        drain_s = time.monotonic() - stopped_at

    assert [result["width"] for result in results] == [256] * 4  # what it was running finished
    assert len(during) == 6
    # Nothing new reached it, over HTTP or gRPC, once the proxy had heard "drain" from its agent.
    assert [cluster.requests_sent(leaving, backend) for backend in (HTTP_BACKEND, GRPC_BACKEND)] == sent_when_draining
    assert "draining for 3 s before the stop" in leaving.log()
    assert drain_s >= DRAIN_S
    cluster.wait_for_status(leaving, "DOWN", timeout_s=60)

    leaving.start()  # a new pod of the rollout: back in rotation once it serves
    leaving.wait_until_ready()
    cluster.wait_for_status(leaving, "UP")


def test_a_replica_killed_under_load_costs_no_request(
    cluster: LocalCluster, store_url: str, hosts: dict[str, Path],
) -> None:
    surviving, killed = cluster.replicas
    with CapabilityLayer(hosts["host-a"], store=store_url) as layer:
        root = mint(layer, cluster, "ops-kill")
        for_alice = root.delegate({}).give("alice")
        for_bob = root.delegate({}).give("bob")
        before = sent(cluster)
        logged = len(cluster.proxy.requests())
        killed_once = threading.Event()

        def kill_when_both_serve() -> None:
            if killed_once.is_set():
                return
            now = sent(cluster)
            if min(after - earlier for after, earlier in zip(now, before, strict=True)) >= 2 and int(
                    cluster.proxy.servers(HTTP_BACKEND)[cluster.server(killed)]["scur"]) >= 1:
                killed.kill()  # with a generation in flight on it
                killed_once.set()

        outcomes = run_hosts(store_url, hosts, {"host-a": ("alice", for_alice.id), "host-b": ("bob", for_bob.id)},
                             threads=2, per_thread=6, options=LONG, while_running=kill_when_both_serve)
        assert killed_once.is_set(), "the load ended before the replica could be killed"
        failures = [outcome for made, _ in outcomes.values() for outcome in made if outcome != "ok"]
        assert failures == [], failures  # no request lost
        assert [len(made) for made, _ in outcomes.values()] == [12, 12]
        audit = [entry["outcome"] for entry in layer.capabilities.audit_entries("ops-kill", action="generate")]
        assert audit.count("ok") == 24
        assert "failed" not in audit
    # The proxy itself sent what the dead replica had in flight to the other one (seeded requests carry an
    # Idempotency-Key), and those requests ended well: the capability layer's own retry was not needed for them.
    retried = [request for request in cluster.proxy.requests()[logged:]
               if request.path.endswith("/infer") and request.retries != "0"]
    assert retried, "the proxy retried nothing"
    assert {(request.server, request.status) for request in retried} == {(cluster.server(surviving), "200")}
    cluster.proxy.wait_for_status(HTTP_BACKEND, cluster.server(killed), "DOWN", timeout_s=30)
    assert cluster.requests_sent(surviving) > before[0]
