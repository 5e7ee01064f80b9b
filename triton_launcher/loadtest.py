"""``scripts/bench --suite``: latency and throughput at concurrency 1, 2, 4 and 8, for every family, on three
paths measured on the same requests in one run:

- ``inprocess``: the pipeline service called in its own process while no server runs (the floor); at
  concurrency *c* it is handed batches of *c* requests, the best the pipeline can do with them;
- ``triton``: the same requests through tritonserver with ``tritonclient`` (one client per thread);
- ``capability``: the same through the capability layer (checks, lease, audit, PNG and base64).

Writes ``bench/results.json`` (machine, versions, commit, every figure, and per-family ratios) and
``bench/throughput.png``, and prints a table. Ratios are what to compare across runs: these machines are
shared and noisy.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import contract
from .paths import PROJECT_ROOT, TINY_PIPELINES
from .repository import FAMILY_MODELS, TINY_PREFIX, build_tiny_repository
from .server import TritonServer, loopback_options

CONCURRENCY = (1, 2, 4, 8)
RESULTS_DIR = PROJECT_ROOT / "bench"
PATHS = ("inprocess", "triton", "capability")


@dataclass(frozen=True)
class Level:
    """One path at one concurrency: per-request latencies and the throughput of the whole level."""

    concurrency: int
    requests: int
    p50_ms: float
    p95_ms: float
    throughput_per_s: float


def summarize(concurrency: int, latencies: Sequence[float], wall_s: float) -> Level:
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return Level(concurrency, len(ordered), round(statistics.median(ordered) * 1000, 2), round(p95 * 1000, 2),
                 round(len(ordered) / wall_s, 3))


def requests_for(concurrency: int, rounds: int, side: int, steps: int) -> list[contract.TextToImage]:
    """``rounds`` requests per client, distinct seeds, one prompt: every path gets exactly these."""
    return [contract.TextToImage(f"a lighthouse on a cliff, variation {index}", width=side, height=side,
                                 num_inference_steps=steps, seed=index)
            for index in range(concurrency * rounds)]


def run_concurrently(concurrency: int, work: Sequence[Any], call: Callable[[Any, Any], object],
                     open_client: Callable[[], Any] = lambda: None) -> Level:
    """``call(client, item)`` for every item, from ``concurrency`` threads pulling from one queue; each thread
    opens its own client (tritonclient's HTTP client works only on the thread that made it)."""
    latencies: list[float] = []
    lock = threading.Lock()
    items = list(enumerate(work))
    failures: list[BaseException] = []

    def worker() -> None:
        client = open_client()
        try:
            while True:
                with lock:
                    if not items or failures:
                        return
                    _, item = items.pop(0)
                started = time.perf_counter()
                call(client, item)
                with lock:
                    latencies.append(time.perf_counter() - started)
        except BaseException as error:  # reported after the level, not from a thread
            with lock:
                failures.append(error)
        finally:
            if client is not None:
                client.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"a request failed at concurrency {concurrency}") from failures[0]
    return summarize(concurrency, latencies, time.perf_counter() - started)


# --- the in-process floor, in a process of its own ----------------------------------------------------------


def inprocess_worker(rounds: int, side: int, steps: int) -> dict[str, Any]:
    """Run by ``--inprocess-worker``: each family's service, handed batches of 1, 2, 4 and 8 requests."""
    import torch

    from diffusers_backend.loading import Placement
    from diffusers_backend.service import DiffusersService
    from diffusers_backend.settings import ModelSettings
    from diffusers_backend.tiny import build_tiny_models

    folders = build_tiny_models(TINY_PIPELINES)
    results: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "families": {}}
    for family in FAMILY_MODELS:
        model = TINY_PREFIX + family
        service = DiffusersService.load(ModelSettings(model, model_source=str(folders[family])), Placement("CPU"))
        service.execute([requests_for(1, 1, side, steps)[0].arrays()])  # warm-up
        levels = []
        for concurrency in CONCURRENCY:
            work = requests_for(concurrency, rounds, side, steps)
            latencies = []
            started = time.perf_counter()
            for first in range(0, len(work), concurrency):
                batch = [request.arrays() for request in work[first:first + concurrency]]
                begun = time.perf_counter()
                service.execute(batch)
                latencies += [time.perf_counter() - begun] * len(batch)  # each waits for its whole batch
            levels.append(asdict(summarize(concurrency, latencies, time.perf_counter() - started)))
        results["families"][model] = levels
    return results


def measure_inprocess(rounds: int, side: int, steps: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "triton_launcher.loadtest", "--inprocess-worker", str(rounds), str(side),
               str(steps)]
    finished = subprocess.run(command, capture_output=True, text=True, check=True, timeout=3600)
    return dict(json.loads(finished.stdout.strip().splitlines()[-1]))


# --- through Triton and through the capability layer ---------------------------------------------------------


def measure_served(server: TritonServer, rounds: int, side: int, steps: int) -> dict[str, dict[str, Any]]:
    from capability import CapabilityLayer

    results: dict[str, dict[str, Any]] = {"triton": {}, "capability": {}}
    with CapabilityLayer(server.options.state_dir) as layer:
        authority = layer.create_authority("bench")
        for family in FAMILY_MODELS:
            model = TINY_PREFIX + family
            handle = layer.mint("bench", authority.id, {"server_url": server.url, "default_model": model,
                                                        "max_concurrent": max(CONCURRENCY)})

            def via_triton(client: Any, request: contract.TextToImage, model: str = model) -> object:
                return client.infer(model, request.http_inputs(), outputs=contract.http_outputs(),
                                    headers=server.headers)

            def via_capability(_client: Any, request: contract.TextToImage, handle: Any = handle) -> object:
                return handle.text_to_image(request.prompt, {
                    "width": request.width, "height": request.height,
                    "numInferenceSteps": request.num_inference_steps, "seed": request.seed})

            def open_triton_client() -> Any:
                return server.http_client(timeout_s=600)

            warm_up = requests_for(1, 1, side, steps)
            run_concurrently(1, warm_up, via_triton, open_triton_client)
            run_concurrently(1, warm_up, via_capability)
            for path, call, opener in (("triton", via_triton, open_triton_client),
                                       ("capability", via_capability, lambda: None)):
                results[path][model] = [
                    asdict(run_concurrently(concurrency, requests_for(concurrency, rounds, side, steps), call,
                                            opener))
                    for concurrency in CONCURRENCY
                ]
        layer.generator.close()  # each thread's capability-layer connection, before the server stops
    return results


# --- report ---------------------------------------------------------------------------------------------------


def ratios(levels: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    def at(path: str, concurrency: int) -> dict[str, Any]:
        return next(level for level in levels[path] if level["concurrency"] == concurrency)

    return {
        "triton_vs_inprocess_c1": round(at("triton", 1)["p50_ms"] / at("inprocess", 1)["p50_ms"], 3),
        "capability_vs_inprocess_c1": round(at("capability", 1)["p50_ms"] / at("inprocess", 1)["p50_ms"], 3),
        "throughput_c8_vs_c1": round(at("triton", 8)["throughput_per_s"] / at("triton", 1)["throughput_per_s"], 3),
        "throughput_c8_vs_inprocess_batch8": round(
            at("triton", 8)["throughput_per_s"] / at("inprocess", 8)["throughput_per_s"], 3),
    }


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"],  # noqa: S607 - git from PATH
                                cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    versions = {name: importlib.metadata.version(name)
                for name in ("torch", "diffusers", "transformers", "numpy", "tritonclient")}
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "versions": versions,
            "commit": commit}


def draw_throughput(results: dict[str, Any], destination: Path) -> None:
    """Throughput against concurrency, one panel per family, one line per path (Pillow only)."""
    from PIL import Image, ImageDraw

    colours = {"inprocess": (90, 90, 90), "triton": (31, 119, 180), "capability": (214, 39, 40)}
    panel_w, panel_h, margin = 360, 260, 40
    image = Image.new("RGB", (panel_w * len(FAMILY_MODELS), panel_h + 40), "white")
    draw = ImageDraw.Draw(image)
    for column, model in enumerate(TINY_PREFIX + family for family in FAMILY_MODELS):
        levels = results["families"][model]["levels"]
        peak = max(level["throughput_per_s"] for path in PATHS for level in levels[path]) * 1.1
        left, top = column * panel_w + margin, 20
        width, height = panel_w - 2 * margin, panel_h - 2 * margin
        draw.rectangle([left, top, left + width, top + height], outline=(0, 0, 0))
        draw.text((left, 4), f"{model}: images/s (max {peak / 1.1:.1f})", fill=(0, 0, 0))
        for index, concurrency in enumerate(CONCURRENCY):
            x = left + width * index / (len(CONCURRENCY) - 1)
            draw.text((x - 3, top + height + 4), str(concurrency), fill=(0, 0, 0))
        for path in PATHS:
            points = [(left + width * index / (len(CONCURRENCY) - 1),
                       top + height - height * level["throughput_per_s"] / peak)
                      for index, level in enumerate(levels[path])]
            draw.line(points, fill=colours[path], width=2)
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[path])
    legend_x = 10
    for path in PATHS:
        draw.rectangle([legend_x, panel_h + 15, legend_x + 12, panel_h + 27], fill=colours[path])
        draw.text((legend_x + 16, panel_h + 15), path, fill=(0, 0, 0))
        legend_x += 140
    draw.text((legend_x + 20, panel_h + 15), "x: concurrent clients (in-process: batch size)", fill=(0, 0, 0))
    image.save(destination)


def run_suite(quick: bool, side: int, steps: int) -> dict[str, Any]:
    rounds = 2 if quick else 6
    repository = build_tiny_repository()
    print(f"in-process floor ({rounds} rounds per client, {side}x{side}, {steps} steps), no server running…",
          flush=True)
    floor = measure_inprocess(rounds, side, steps)
    with tempfile.TemporaryDirectory(prefix="bench-state-") as state_dir, \
            TritonServer(loopback_options(repository, Path(state_dir))) as server:
        print("through Triton and through the capability layer…", flush=True)
        served = measure_served(server, rounds, side, steps)
    results: dict[str, Any] = {
        "machine": {**machine(), "torch_threads": floor["torch_threads"]},
        "settings": {"side": side, "steps": steps, "rounds_per_client": rounds, "concurrency": list(CONCURRENCY)},
        "families": {},
    }
    for family in FAMILY_MODELS:
        model = TINY_PREFIX + family
        levels = {"inprocess": floor["families"][model], "triton": served["triton"][model],
                  "capability": served["capability"][model]}
        results["families"][model] = {"levels": levels, "ratios": ratios(levels)}
    return results


def print_table(results: dict[str, Any]) -> None:
    print("\n| model | path | " + " | ".join(f"c={c} p50 / img/s" for c in CONCURRENCY) + " |")
    print("|---|---|" + "---|" * len(CONCURRENCY))
    for model, entry in results["families"].items():
        for path in PATHS:
            cells = " | ".join(f"{level['p50_ms']:.0f} ms / {level['throughput_per_s']:.1f}"
                               for level in entry["levels"][path])
            print(f"| {model} | {path} | {cells} |")
    print("\n| model | " + " | ".join(next(iter(results["families"].values()))["ratios"]) + " |")
    print("|---|" + "---|" * 4)
    for model, entry in results["families"].items():
        print(f"| {model} | " + " | ".join(f"{value:.2f}" for value in entry["ratios"].values()) + " |")


KNOB_SETTINGS = {
    "1 instance, torch default threads": (1, None),
    "1 instance, 1 thread": (1, 1),
    "2 instances, 1 thread each": (2, 1),
    "2 instances, default threads each": (2, None),
}
"""Instance count and ``cpu_threads`` combinations tried by :func:`knob_sweep`."""


def knob_sweep(family: str = "sd15", rounds: int = 4, side: int = 256, steps: int = 4) -> int:
    """Throughput through Triton of one tiny model under each of :data:`KNOB_SETTINGS`."""
    import os
    import shutil

    from .repository import with_parameters

    base = build_tiny_repository()
    model = TINY_PREFIX + family
    print(f"| {model}, {side}x{side}, {steps} steps | " + " | ".join(f"c={c}" for c in CONCURRENCY) + " |")
    print("|---|" + "---|" * len(CONCURRENCY))
    for name, (count, threads) in KNOB_SETTINGS.items():
        with tempfile.TemporaryDirectory(prefix="bench-knobs-") as scratch:
            repository = Path(scratch) / "repository"
            shutil.copytree(base / model, repository / model)
            config = repository / model / "config.pbtxt"
            text = config.read_text().replace("kind: KIND_CPU count: 1", f"kind: KIND_CPU count: {count}")
            changes = {"model_source": os.path.relpath(TINY_PIPELINES / model, config.parent)}
            if threads is not None:
                changes["cpu_threads"] = str(threads)
            config.write_text(with_parameters(text, changes))
            with TritonServer(loopback_options(repository, Path(scratch) / "state")) as server:
                def call(client: Any, request: contract.TextToImage, server: TritonServer = server) -> object:
                    return client.infer(model, request.http_inputs(), outputs=contract.http_outputs(),
                                        headers=server.headers)

                def open_client(server: TritonServer = server) -> Any:
                    return server.http_client(timeout_s=600)

                run_concurrently(1, requests_for(1, 2, side, steps), call, open_client)  # warm-up
                cells = []
                for concurrency in CONCURRENCY:
                    level = run_concurrently(concurrency, requests_for(concurrency, rounds, side, steps), call,
                                             open_client)
                    cells.append(f"{level.p50_ms:.0f} ms, {level.throughput_per_s:.1f}/s")
                print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


def main_suite(quick: bool, side: int = 256, steps: int = 4) -> int:
    results = run_suite(quick, side, steps)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    draw_throughput(results, RESULTS_DIR / "throughput.png")
    print_table(results)
    print(f"\nwrote {RESULTS_DIR / 'results.json'} and {RESULTS_DIR / 'throughput.png'}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--inprocess-worker"]:
        rounds, side, steps = (int(value) for value in sys.argv[2:5])
        print(json.dumps(inprocess_worker(rounds, side, steps)))
        sys.exit(0)
    sys.exit(main_suite(quick="--quick" in sys.argv))
