"""``scripts/bench --replicas``: two Triton replicas behind the Helm chart's HAProxy, measured side by side.

On one machine (:mod:`workbench.replicas`: two launchers with one key, Debian's HAProxy with the chart's
haproxy.cfg), tiny-sd15 at 64x64 and 2 steps:

- the proxy's added latency at concurrency 1: the same seeded requests straight to one replica and through the
  proxy (tritonclient over HTTP keep-alive either way), in alternating rounds; p50 of each, and the difference;
- how requests spread: 48 requests at concurrency 4 through the proxy, per replica (HAProxy's log);
- a drain: generations in flight on replica 1 when it gets SIGTERM; how long until it exited, whether it exited
  in order, and how many requests reached it after its agent said "drain" (must be 0);
- a kill: replica 2 SIGKILLed while 4 threads of the capability layer generate 40 seeded images through the
  proxy; how many the application lost (must be 0), and how many the proxy sent again elsewhere.

Writes ``bench/replicas.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from inference_client import contract, triton
from triton_launcher.repository import build_tiny_repository

from .loadtest import RESULTS_DIR, machine, run_concurrently
from .replicas import GRPC_BACKEND, HTTP_BACKEND, LocalCluster
from .waiting import wait_until

MODEL = "tiny-sd15"
SIDE, STEPS = 64, 2


def request(seed: int, side: int = SIDE, steps: int = STEPS) -> contract.TextToImage:
    return contract.TextToImage("a red cube", width=side, height=side, num_inference_steps=steps, seed=seed)


def proxy_latency(cluster: LocalCluster, rounds: int, per_round: int) -> dict[str, Any]:
    direct: list[float] = []
    proxied: list[float] = []
    replica = cluster.replicas[0]
    for round_number in range(rounds):
        for target, samples in ((replica.url, direct), (cluster.url, proxied)):
            with triton.http_client(target.removeprefix("http://"), timeout_s=120) as client:
                triton.infer_http(client, MODEL, request(0), cluster.key)  # the connection, opened
                for index in range(per_round):
                    started = time.perf_counter()
                    triton.infer_http(client, MODEL, request(round_number * per_round + index), cluster.key)
                    samples.append(time.perf_counter() - started)
    p50 = {"direct": statistics.median(direct) * 1000, "proxied": statistics.median(proxied) * 1000}
    return {"requests_each": len(direct), "p50_ms": {name: round(value, 2) for name, value in p50.items()},
            "added_p50_ms": round(p50["proxied"] - p50["direct"], 2)}


def spread(cluster: LocalCluster, count: int) -> dict[str, int]:
    logged = len(cluster.proxy.requests())

    def call(client: Any, seed: int) -> object:
        return triton.infer_http(client, MODEL, request(seed), cluster.key)

    run_concurrently(4, list(range(count)), call, lambda: triton.http_client(cluster.url.removeprefix("http://"),
                                                                            timeout_s=120))
    served = [entry.server for entry in cluster.proxy.requests()[logged:] if entry.path.endswith("/infer")]
    return {cluster.server(replica): served.count(cluster.server(replica)) for replica in cluster.replicas}


def drain(cluster: LocalCluster) -> dict[str, Any]:
    leaving = cluster.replicas[0]
    server = cluster.server(leaving)
    outcomes: list[object] = []

    def long_generation(seed: int) -> None:
        with triton.http_client(cluster.url.removeprefix("http://"), timeout_s=300) as client:
            try:
                outcomes.append(triton.infer_http(client, MODEL, request(seed, 256, 16), cluster.key))
            except Exception as error:  # reported, not raised: the figure is how many finished
                outcomes.append(error)

    threads = [threading.Thread(target=long_generation, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: int(cluster.proxy.servers(HTTP_BACKEND)[server]["scur"]) >= 1, 60, "a request in flight")
    in_flight = int(cluster.proxy.servers(HTTP_BACKEND)[server]["scur"])
    stopped_at = time.perf_counter()
    leaving.terminate()
    cluster.wait_for_status(leaving, "DRAIN", timeout_s=30)
    out_of_rotation_s = time.perf_counter() - stopped_at
    sent_then = [cluster.requests_sent(leaving, backend) for backend in (HTTP_BACKEND, GRPC_BACKEND)]
    with triton.http_client(cluster.url.removeprefix("http://"), timeout_s=120) as client:
        for seed in range(6):
            triton.infer_http(client, MODEL, request(500 + seed), cluster.key)
    code = leaving.wait(timeout_s=300)
    drain_s = time.perf_counter() - stopped_at
    for thread in threads:
        thread.join()
    reached_after = sum(cluster.requests_sent(leaving, backend) for backend in (HTTP_BACKEND, GRPC_BACKEND)) - sum(
        sent_then)
    leaving.start()
    leaving.wait_until_ready()
    cluster.wait_for_status(leaving, "UP")
    return {"in_flight_on_it": in_flight, "drain_seconds_option": leaving.drain_seconds,
            "out_of_rotation_s": round(out_of_rotation_s, 2), "sigterm_to_exit_s": round(drain_s, 2),
            "exit_code": code, "requests_reaching_it_after_drain": reached_after,
            "generations_finished": sum(isinstance(outcome, contract.GeneratedImage) for outcome in outcomes),
            "generations": len(outcomes)}


def kill(cluster: LocalCluster, scratch: Path) -> dict[str, Any]:
    from capability import CapabilityLayer
    from capability.servers import ServerKeys

    killed = cluster.replicas[1]
    store = f"sqlite://{scratch / 'capabilities.sqlite3'}"
    state = scratch / "host"
    state.mkdir(mode=0o700, exist_ok=True)
    outcomes: list[str] = []
    lock = threading.Lock()
    logged = len(cluster.proxy.requests())
    with CapabilityLayer(state, store=store) as layer:
        ServerKeys(layer.store, state).register(cluster.url, cluster.key_file, grpc_address=cluster.grpc_address)
        authority = layer.create_authority("bench")
        handle = layer.mint("bench", authority.id, {"server_url": cluster.url, "default_model": MODEL})

        def generate(thread: int) -> None:
            for index in range(10):
                try:
                    handle.text_to_image("a red cube", {"width": 256, "height": 256, "numInferenceSteps": 16,
                                                        "seed": thread * 100 + index})
                    outcome = "ok"
                except Exception as error:  # counted: what the application would have lost
                    outcome = f"{type(error).__name__}: {error}"
                with lock:
                    outcomes.append(outcome)

        threads = [threading.Thread(target=generate, args=(thread,)) for thread in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(outcomes) >= 4 and int(
            cluster.proxy.servers(HTTP_BACKEND)[cluster.server(killed)]["scur"]) >= 1, 120, "load on both replicas")
        killed.kill()
        for thread in threads:
            thread.join()
    entries = [entry for entry in cluster.proxy.requests()[logged:] if entry.path.endswith("/infer")]
    return {"generations": len(outcomes), "lost": sum(outcome != "ok" for outcome in outcomes),
            "errors": sorted({outcome for outcome in outcomes if outcome != "ok"})[:3],
            "proxy_retried": sum(entry.retries != "0" for entry in entries),
            "per_replica": {cluster.server(replica): sum(entry.server == cluster.server(replica)
                                                         and entry.status == "200" for entry in entries)
                            for replica in cluster.replicas}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench --replicas", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of direct and proxied (default 5)")
    parser.add_argument("--per-round", type=int, default=20, help="requests per round and path (default 20)")
    arguments = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="replica-bench-") as directory:
        scratch = Path(directory)
        repository = build_tiny_repository(scratch / "repository", families=("sd15",), streaming=())
        with LocalCluster(repository, scratch / "cluster", replicas=2, drain_seconds=3.0) as cluster:
            latency = proxy_latency(cluster, arguments.rounds, arguments.per_round)
            per_replica = spread(cluster, 48)
            drained = drain(cluster)
            killed = kill(cluster, scratch)
    results = {"machine": machine(), "model": MODEL, "side": SIDE, "steps": STEPS, "proxy_latency": latency,
               "spread_c4": per_replica, "drain": drained, "kill": killed}
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "replicas.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"{MODEL}, {SIDE}x{SIDE}, {STEPS} steps, two replicas behind the chart's HAProxy")
    print(f"| proxy at c=1 | direct p50 {latency['p50_ms']['direct']:.1f} ms | proxied p50 "
          f"{latency['p50_ms']['proxied']:.1f} ms | added {latency['added_p50_ms']:+.2f} ms |")
    print("| requests per replica (48 at c=4) | " + ", ".join(f"{name} {count}" for name, count in
                                                             per_replica.items()) + " |")
    print(f"| drain (SIGTERM, --drain-seconds {drained['drain_seconds_option']:.0f}) | out of rotation in "
          f"{drained['out_of_rotation_s']:.2f} s, exited {drained['exit_code']} after "
          f"{drained['sigterm_to_exit_s']:.1f} s, "
          f"{drained['generations_finished']}/{drained['generations']} in flight finished, "
          f"{drained['requests_reaching_it_after_drain']} requests reached it after |")
    print(f"| kill under load | {killed['lost']} of {killed['generations']} generations lost, "
          f"{killed['proxy_retried']} retried by the proxy, served: {killed['per_replica']} |")
    print("wrote bench/replicas.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
