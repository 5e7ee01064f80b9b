"""``scripts/bench --service``: what the HTTP service adds to a generation, against the Python API it wraps.

Measured side by side in one run, on one tiny model (tiny-sd15, 64x64, 2 steps: a short generation, so that the
service's share stands out), against one tritonserver on loopback: the Python API (``CapabilityHandle.
text_to_image`` in this process, one thread per concurrent caller) and the service (``python -m capability serve``
in its own process, each caller a keep-alive HTTP connection posting JSON and decoding the answer), in
alternating rounds so that the machine's drift falls on both alike. Both use the same SQLite store, capability and
seeds. Reported: the p50 latency of each at concurrency 1 and the service's added latency (the difference), and the
throughput of each at concurrency 8 with their ratio (the issue's target: at least 0.95).

Writes ``bench/service.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import http.client
import json
import tempfile
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capability import CapabilityLayer
from capability.tokens import Tokens
from triton_launcher.repository import build_tiny_repository
from triton_launcher.server import TritonServer, loopback_options

from .loadtest import RESULTS_DIR, Samples, machine, run_concurrently, summarize
from .service import ServiceProcess

MODEL = "tiny-sd15"
SIDE, STEPS = 64, 2
CONCURRENCY = (1, 8)
ROUNDS = 4
PER_ROUND = {1: 10, 8: 40}
ADMIN = "bench-admin"


class ServiceClient:
    """One keep-alive connection to the service, as an application's HTTP client keeps one."""

    def __init__(self, url: str, token: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=300)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def generate(self, capability: str, prompt: str, options: dict[str, Any]) -> dict[str, Any]:
        self.connection.request("POST", f"/v1/capabilities/{capability}/text-to-image",
                                body=json.dumps({"prompt": prompt, "options": options}), headers=self.headers)
        response = self.connection.getresponse()
        body = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"the service answered {response.status}: {body}")
        return dict(body)

    def close(self) -> None:
        self.connection.close()


def options(seed: int) -> dict[str, Any]:
    return {"width": SIDE, "height": SIDE, "numInferenceSteps": STEPS, "seed": seed}


def measure(layer: CapabilityLayer, service: ServiceProcess, capability: str, token: str) -> dict[str, Any]:
    python_api = layer.handle(ADMIN, capability)
    paths: dict[str, tuple[Callable[[Any, int], object], Callable[[], Any]]] = {
        "python": (lambda _, seed: python_api.text_to_image("a bench of stone", options(seed)), lambda: None),
        "service": (lambda client, seed: client.generate(capability, "a bench of stone", options(seed)),
                    lambda: ServiceClient(service.url, token)),
    }
    for call, open_client in paths.values():  # warm both: connections, the store's pages, the model
        run_concurrently(2, list(range(4)), call, open_client)
    pooled: dict[tuple[str, int], list[Samples]] = {}
    seed = 0
    for _ in range(ROUNDS):
        for concurrency in CONCURRENCY:
            for name, (call, open_client) in paths.items():
                work = list(range(seed, seed + PER_ROUND[concurrency]))
                seed += len(work)
                pooled.setdefault((name, concurrency), []).append(
                    run_concurrently(concurrency, work, call, open_client))
    levels = {key: summarize(key[1], [latency for samples in runs for latency in samples.latencies],
                             sum(samples.wall_s for samples in runs)) for key, runs in pooled.items()}
    result: dict[str, Any] = {
        name: {str(concurrency): vars(levels[name, concurrency]) for concurrency in CONCURRENCY}
        for name in paths}
    result["added_ms_c1"] = round(levels["service", 1].p50_ms - levels["python", 1].p50_ms, 2)
    result["throughput_ratio_c8"] = round(
        levels["service", 8].throughput_per_s / levels["python", 8].throughput_per_s, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench --service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="service-bench-") as scratch:
        state_dir = Path(scratch) / "state"
        options_ = loopback_options(build_tiny_repository(), state_dir, ready_timeout_s=300)
        with TritonServer(options_) as server, CapabilityLayer(state_dir) as layer:
            authority = layer.create_authority(ADMIN).id
            capability = layer.mint(ADMIN, authority, {"server_url": server.url, "default_model": MODEL}).id
            token = Tokens(layer.store).issue(ADMIN, ADMIN, 3600).token
            with ServiceProcess(state_dir, Path(scratch) / "service.log") as service:
                figures = measure(layer, service, capability, token)
    report = {"machine": machine(), "model": MODEL, "side": SIDE, "steps": STEPS, **figures}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "service.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'path':<10}{'c':>3}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'req/s':>9}")
    for name in ("python", "service"):
        for concurrency in CONCURRENCY:
            level = figures[name][str(concurrency)]
            print(f"{name:<10}{concurrency:>3}{level['requests']:>6}{level['p50_ms']:>10}{level['p95_ms']:>10}"
                  f"{level['throughput_per_s']:>9}")
    print(f"the service adds {figures['added_ms_c1']} ms per generation at c=1 (p50); at c=8 it delivers "
          f"{figures['throughput_ratio_c8']} of the Python API's throughput (bench/service.json)")
    return 0
