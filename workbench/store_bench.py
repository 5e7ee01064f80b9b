"""``scripts/bench --stores``: what each capability store adds to a generation, and how fast slots turn over.

Measured side by side in one run, on one tiny model (tiny-sd15, 64x64, 2 steps: a short generation, so that the
layer's share stands out), against one tritonserver and one throwaway PostgreSQL server on loopback:

- per generation, at concurrency 1 and 8: Triton alone (tritonclient with the key), then the capability layer on
  the SQLite store and on the PostgreSQL store (checks, the slot taken and freed, the audit record, PNG and
  base64), in alternating rounds so that the machine's drift falls on every path alike; the added latency is each
  path's p50 minus Triton's, and the layer's own time is each request's time outside its server call (timed
  around that call), so that it does not rest only on the difference of two noisy figures; under the shipped
  tiny config (no queue delay) and under a 5 ms queue delay;
- slot turnover: 16 processes take and free slots of one capability tree (each cycle two write transactions:
  the slot with the chain re-checked under its lock, then its release with the audit record) as fast as they can,
  on each store.

Writes ``bench/stores.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
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
# The shipped tiny config has no queue delay; with a few milliseconds, Triton waits for the requests that the
# slot's serial transactions stagger, and batches them as it does requests sent together.
QUEUE_DELAYS_US = (0, 5000)
SPAWN = multiprocessing.get_context("spawn")


class ServerCallTimer:
    """Times every server call the capability layer makes, per thread, so that the layer's own share of a
    generation (checks, slot, audit, PNG and base64: the whole call less its server call) is measured directly
    and not only as a difference of two noisy end-to-end figures."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._original: Any = None

    def install(self) -> None:
        from capability.servers import TritonGateway

        original = self._original = TritonGateway.generate
        timer = self

        def timed(gateway: Any, triton_model: str, request: contract.TextToImage) -> Any:
            began = time.perf_counter()
            try:
                return original(gateway, triton_model, request)
            finally:
                timer._local.server_s = getattr(timer._local, "server_s", 0.0) + time.perf_counter() - began

        TritonGateway.generate = timed  # type: ignore[method-assign,assignment]

    def uninstall(self) -> None:
        from capability.servers import TritonGateway

        TritonGateway.generate = self._original  # type: ignore[method-assign]

    def own_time(self, call: Callable[[], object]) -> float:
        """Seconds ``call()`` spent outside the server call."""
        self._local.server_s = 0.0
        began = time.perf_counter()
        call()
        server_s: float = self._local.server_s
        return time.perf_counter() - began - server_s


def measure_generations(server: TritonServer, stores: dict[str, str], rounds: int, per_round: int) -> dict[str, Any]:
    from capability import CapabilityLayer

    layers = {name: CapabilityLayer(server.options.state_dir, store=url) for name, url in stores.items()}
    handles = {}
    for name, layer in layers.items():
        authority = layer.create_authority("bench")
        handles[name] = layer.mint("bench", authority.id, {"server_url": server.url, "default_model": MODEL,
                                                            "max_concurrent": max(CONCURRENCY)})
    timer = ServerCallTimer()
    own: dict[str, dict[int, list[float]]] = {f"capability-{name}": {c: [] for c in CONCURRENCY} for name in stores}
    own_lock = threading.Lock()

    def via_triton(client: Any, seed: int) -> object:
        request = contract.TextToImage("a red cube", width=SIDE, height=SIDE, num_inference_steps=STEPS, seed=seed)
        return triton.infer_http(client, MODEL, request, server.infer_key)

    def via(name: str, concurrency: int) -> Callable[[Any, int], object]:
        def call(_client: Any, seed: int) -> object:
            seconds = timer.own_time(lambda: handles[name].text_to_image(
                "a red cube", {"width": SIDE, "height": SIDE, "numInferenceSteps": STEPS, "seed": seed}))
            with own_lock:
                own[f"capability-{name}"][concurrency].append(seconds)
            return None
        return call

    paths = ["triton", *(f"capability-{name}" for name in stores)]
    latencies: dict[str, dict[int, list[float]]] = {path: {c: [] for c in CONCURRENCY} for path in paths}
    timer.install()
    try:
        for _ in range(rounds):
            for concurrency in CONCURRENCY:
                work = list(range(per_round * concurrency))
                for path in paths:
                    if path == "triton":
                        samples = run_concurrently(concurrency, work, via_triton,
                                                   lambda: server.http_client(timeout_s=600))
                    else:
                        samples = run_concurrently(concurrency, work, via(path.removeprefix("capability-"),
                                                                          concurrency))
                    latencies[path][concurrency] += samples.latencies
    finally:
        timer.uninstall()
        for layer in layers.values():
            layer.close()

    result: dict[str, Any] = {}
    for concurrency in CONCURRENCY:
        p50 = {path: statistics.median(samples[concurrency]) * 1000 for path, samples in latencies.items()}
        result[f"c{concurrency}"] = {
            "p50_ms": {path: round(value, 2) for path, value in p50.items()},
            "added_p50_ms": {path: round(value - p50["triton"], 2) for path, value in p50.items() if path != "triton"},
            "own_p50_ms": {path: round(statistics.median(samples[concurrency]) * 1000, 2)
                           for path, samples in own.items()},
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


def with_queue_delay(repository: Path, queue_delay_us: int) -> None:
    config = repository / MODEL / "config.pbtxt"
    text, count = re.subn(r"max_queue_delay_microseconds: \d+", f"max_queue_delay_microseconds: {queue_delay_us}",
                          config.read_text())
    if count != 1:
        raise RuntimeError(f"{config}: expected one max_queue_delay_microseconds line, found {count}")
    config.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench --stores", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of every path (default: 5)")
    parser.add_argument("--per-round", type=int, default=8,
                        help="requests per round and thread of concurrency (default: 8)")
    parser.add_argument("--cycles", type=int, default=200, help="slot cycles per process (default: 200)")
    parser.add_argument("--queue-delays", default=",".join(map(str, QUEUE_DELAYS_US)),
                        help="max_queue_delay_microseconds settings to serve under, comma-separated "
                             f"(default: {','.join(map(str, QUEUE_DELAYS_US))}; 0 is the shipped one)")
    arguments = parser.parse_args(argv)
    queue_delays = [int(value) for value in arguments.queue_delays.split(",")]

    generations: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="store-bench-") as scratch, postgres_server() as postgres:
        root = Path(scratch)
        repository = build_tiny_repository(root / "repository", families=("sd15",), streaming=())
        for queue_delay_us in queue_delays:
            with_queue_delay(repository, queue_delay_us)
            stores = {"sqlite": f"sqlite://{root / f'capabilities-{queue_delay_us}.sqlite3'}",
                      "postgresql": postgres.database()}
            with TritonServer(loopback_options(repository, root / "state")) as server:
                generations[f"queue_delay_{queue_delay_us}us"] = measure_generations(
                    server, stores, arguments.rounds, arguments.per_round)
        turnover = {"sqlite": measure_turnover(f"sqlite://{root / 'turnover.sqlite3'}", arguments.cycles),
                    "postgresql": measure_turnover(postgres.database(), arguments.cycles)}
    results = {"machine": machine(), "model": MODEL, "side": SIDE, "steps": STEPS, "generations": generations,
               "slot_turnover": turnover}
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "stores.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"{MODEL}, {SIDE}x{SIDE}, {STEPS} steps: p50 per generation; 'own' is the layer's time outside its server "
          "call, 'added' its p50 less Triton's")
    print("| queue delay | concurrency | triton | SQLite: p50, own, added | PostgreSQL: p50, own, added |")
    print("|---|---|---|---|---|")
    for setting, levels in generations.items():
        for concurrency in CONCURRENCY:
            level = levels[f"c{concurrency}"]
            p50, own, added = level["p50_ms"], level["own_p50_ms"], level["added_p50_ms"]
            cells = [f"{p50[path]:.1f} ms, {own[path]:.2f} ms, {added[path]:+.1f} ms"
                     for path in ("capability-sqlite", "capability-postgresql")]
            print(f"| {setting.removeprefix('queue_delay_')} | {concurrency} | {p50['triton']:.1f} ms | "
                  + " | ".join(cells) + " |")
    print(f"slot take-and-release, {PROCESSES} processes on one tree: " + ", ".join(
        f"{name} {figures['slots_per_s']:.0f}/s" for name, figures in turnover.items()))
    print("wrote bench/stores.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
