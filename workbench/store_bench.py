"""``scripts/bench --stores``: what each capability store adds to a generation, and how fast slots turn over.

Measured side by side in one run, on one tiny model (tiny-sd15, 64x64, 2 steps: a short generation, so that the
layer's share stands out), against one tritonserver and one throwaway PostgreSQL server on loopback:

- per generation, at concurrency 1 and 8: Triton alone (tritonclient with the key), then the capability layer on
  the SQLite store and on the PostgreSQL store (checks, the slot taken and freed, the audit record, PNG and
  base64), in alternating rounds so that the machine's drift falls on every path alike; the added latency is each
  path's p50 minus Triton's;
- slot turnover: 16 processes take and free slots of one capability tree (each cycle two write transactions:
  the slot with the chain re-checked under its lock, then its release with the audit record) as fast as they can,
  on each store.

Writes ``bench/stores.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from inference_client import contract, triton
from triton_launcher.repository import build_tiny_repository
from triton_launcher.server import TritonServer, loopback_options

from .loadtest import RESULTS_DIR, machine, run_concurrently
from .postgres import postgres_server

MODEL = "tiny-sd15"
SIDE, STEPS = 64, 2
CONCURRENCY = (1, 8)
PROCESSES = 16
SPAWN = multiprocessing.get_context("spawn")


def measure_generations(server: TritonServer, stores: dict[str, str], rounds: int, per_round: int) -> dict[str, Any]:
    from capability import CapabilityLayer

    layers = {name: CapabilityLayer(server.options.state_dir, store=url) for name, url in stores.items()}
    handles = {}
    for name, layer in layers.items():
        authority = layer.create_authority("bench")
        handles[name] = layer.mint("bench", authority.id, {"server_url": server.url, "default_model": MODEL,
                                                            "max_concurrent": max(CONCURRENCY)})

    def via_triton(client: Any, seed: int) -> object:
        request = contract.TextToImage("a red cube", width=SIDE, height=SIDE, num_inference_steps=STEPS, seed=seed)
        return triton.infer_http(client, MODEL, request, server.infer_key)

    def via(name: str) -> Any:
        def call(_client: Any, seed: int) -> object:
            return handles[name].text_to_image("a red cube", {"width": SIDE, "height": SIDE,
                                                              "numInferenceSteps": STEPS, "seed": seed})
        return call

    paths = {"triton": via_triton, **{f"capability-{name}": via(name) for name in stores}}
    latencies: dict[str, dict[int, list[float]]] = {path: {c: [] for c in CONCURRENCY} for path in paths}
    for _ in range(rounds):
        for concurrency in CONCURRENCY:
            work = list(range(per_round * concurrency))
            for path, call in paths.items():
                opener = (lambda: server.http_client(timeout_s=600)) if path == "triton" else (lambda: None)
                latencies[path][concurrency] += run_concurrently(concurrency, work, call, opener).latencies
    for layer in layers.values():
        layer.close()

    result: dict[str, Any] = {}
    for concurrency in CONCURRENCY:
        p50 = {path: statistics.median(samples[concurrency]) * 1000 for path, samples in latencies.items()}
        result[f"c{concurrency}"] = {
            "p50_ms": {path: round(value, 2) for path, value in p50.items()},
            "added_p50_ms": {path: round(value - p50["triton"], 2) for path, value in p50.items() if path != "triton"},
            "requests_per_path": len(latencies["triton"][concurrency]),
        }
    return result


def _turn_over(url: str, capability_id: str, cycles: int, start: Any, results: Any) -> None:
    from capability.capabilities import Capabilities
    from capability.store import open_store

    capabilities = Capabilities(open_store(url, Path("/nonexistent")))
    start.wait()
    began = time.perf_counter()
    for _ in range(cycles):
        lease = capabilities.acquire_slot("bench", capability_id)
        capabilities.release_slot(lease, {"entity": "bench", "capability_id": capability_id, "action": "generate",
                                          "outcome": "ok"})
    results.put(time.perf_counter() - began)


def measure_turnover(url: str, cycles: int) -> dict[str, Any]:
    """``PROCESSES`` processes each take and free ``cycles`` slots of one tree; slots per second in all."""
    from capability.capabilities import Capabilities
    from capability.store import open_store

    store = open_store(url, Path("/nonexistent"))
    capabilities = Capabilities(store)
    authority = capabilities.create_authority("bench").id
    root = capabilities.mint("bench", authority, {"server_url": "http://127.0.0.1:8000", "default_model": MODEL,
                                                  "max_concurrent": PROCESSES}).id
    leaf = capabilities.delegate("bench", root, {}).id
    store.close()
    start, results = SPAWN.Barrier(PROCESSES + 1), SPAWN.Queue()
    processes = [SPAWN.Process(target=_turn_over, args=(url, leaf, cycles, start, results)) for _ in range(PROCESSES)]
    for process in processes:
        process.start()
    start.wait()
    began = time.perf_counter()
    durations = [results.get(timeout=600) for _ in processes]
    wall = time.perf_counter() - began
    for process in processes:
        process.join(60)
    return {"processes": PROCESSES, "cycles_each": cycles, "slots_per_s": round(PROCESSES * cycles / wall, 1),
            "slowest_process_s": round(max(durations), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench --stores", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of every path (default: 5)")
    parser.add_argument("--per-round", type=int, default=8,
                        help="requests per round and thread of concurrency (default: 8)")
    parser.add_argument("--cycles", type=int, default=200, help="slot cycles per process (default: 200)")
    arguments = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="store-bench-") as scratch, postgres_server() as postgres:
        root = Path(scratch)
        stores = {"sqlite": f"sqlite://{root / 'capabilities.sqlite3'}", "postgresql": postgres.database()}
        repository = build_tiny_repository(root / "repository", families=("sd15",), streaming=())
        with TritonServer(loopback_options(repository, root / "state")) as server:
            generations = measure_generations(server, stores, arguments.rounds, arguments.per_round)
        turnover = {"sqlite": measure_turnover(f"sqlite://{root / 'turnover.sqlite3'}", arguments.cycles),
                    "postgresql": measure_turnover(postgres.database(), arguments.cycles)}
    results = {"machine": machine(), "model": MODEL, "side": SIDE, "steps": STEPS, "generations": generations,
               "slot_turnover": turnover}
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "stores.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"{MODEL}, {SIDE}x{SIDE}, {STEPS} steps: p50 per generation, and what the capability layer adds to Triton")
    print("| concurrency | triton | capability (SQLite) | capability (PostgreSQL) | added: SQLite "
          "| added: PostgreSQL |")
    print("|---|---|---|---|---|---|")
    for concurrency in CONCURRENCY:
        level = generations[f"c{concurrency}"]
        p50, added = level["p50_ms"], level["added_p50_ms"]
        print(f"| {concurrency} | {p50['triton']:.1f} ms | {p50['capability-sqlite']:.1f} ms | "
              f"{p50['capability-postgresql']:.1f} ms | {added['capability-sqlite']:+.1f} ms | "
              f"{added['capability-postgresql']:+.1f} ms |")
    print(f"slot take-and-release, {PROCESSES} processes on one tree: " + ", ".join(
        f"{name} {figures['slots_per_s']:.0f}/s" for name, figures in turnover.items()))
    print("wrote bench/stores.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
