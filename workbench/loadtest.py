"""``scripts/bench``: latency and throughput at concurrency 1, 2, 4 and 8, for every family, on three paths
measured on the same requests in one run:

- ``inprocess``: the pipeline service called in a process of its own while no server runs (the floor); at
  concurrency *c* it is handed batches of *c* requests, the best the pipeline can do with them;
- each family in turn: half the floor, then a server with only that family for the two served paths, then
  the other half of the floor (the floor's process waits, idle, while the server runs). Speed on these shared
  machines drifts by 10-20 % over minutes; measuring the paths of a family within the same half minute keeps
  that drift out of their ratios;
- ``triton``: the same requests through tritonserver with ``tritonclient`` (one client per thread);
- ``capability``: the same through the capability layer (checks, lease, audit, PNG and base64).

Also measured in the same run: the server's start-up to READY, its memory (all four tiny families loaded,
and what each extra instance costs), where Triton's time goes at concurrency 1 (Triton's own statistics
against the client's clock), and PNG + base64 against Pillow on 1024² images.

Writes ``bench/results.json`` and ``bench/throughput.png``, and prints a table. Ratios are what to compare
across runs: these machines are shared and noisy.
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

from inference_client import contract, triton
from triton_launcher.installation import with_malloc_tunables
from triton_launcher.paths import PROJECT_ROOT, TINY_PIPELINES
from triton_launcher.repository import FAMILY_MODELS, TINY_PREFIX, build_tiny_repository
from triton_launcher.server import TritonServer, loopback_options

CONCURRENCY = (1, 2, 4, 8)
RESULTS_DIR = PROJECT_ROOT / "bench"
PATHS = ("inprocess", "triton", "capability")
FOLDED_FILES = {"knobs": "knobs.json", "perf_analyzer": "perf_analyzer.json"}
"""Results of scripts/bench --knobs and scripts/perf-analyzer, copied into results.json under these keys."""


@dataclass(frozen=True)
class Plan:
    """What one run measures. ``rounds``: requests per client at concurrency > 1; concurrency 1 gets
    ``solo_rounds`` (it carries the overhead ratios, so it gets more samples)."""

    sides: tuple[int, ...] = (256,)
    steps: int = 4
    rounds: int = 6
    solo_rounds: int = 24

    def requests(self, concurrency: int, side: int) -> list[contract.TextToImage]:
        """Distinct seeds, one prompt: every path gets exactly these."""
        count = self.solo_rounds if concurrency == 1 else concurrency * self.rounds
        return [contract.TextToImage(f"a lighthouse on a cliff, variation {index}", width=side, height=side,
                                     num_inference_steps=self.steps, seed=index)
                for index in range(count)]

    def half(self) -> Plan:
        """Each of the two in-process phases runs half the requests."""
        return Plan(self.sides, self.steps, max(1, self.rounds // 2), max(1, self.solo_rounds // 2))


QUICK = Plan(rounds=2, solo_rounds=12)
FULL = Plan(sides=(256, 512), rounds=6, solo_rounds=24)
DEFAULT = Plan(rounds=6, solo_rounds=24)


@dataclass(frozen=True)
class Level:
    """One path at one concurrency: per-request latencies and the throughput of the whole level."""

    concurrency: int
    requests: int
    p50_ms: float
    p95_ms: float
    throughput_per_s: float


@dataclass
class Samples:
    """Raw figures of a level, so that levels measured in two phases can be pooled."""

    latencies: list[float]
    wall_s: float

    def level(self, concurrency: int) -> Level:
        return summarize(concurrency, self.latencies, self.wall_s)


def summarize(concurrency: int, latencies: Sequence[float], wall_s: float) -> Level:
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return Level(concurrency, len(ordered), round(statistics.median(ordered) * 1000, 2), round(p95 * 1000, 2),
                 round(len(ordered) / wall_s, 3))


def run_concurrently(concurrency: int, work: Sequence[Any], call: Callable[[Any, Any], object],
                     open_client: Callable[[], Any] = lambda: None) -> Samples:
    """``call(client, item)`` for every item, from ``concurrency`` threads pulling from one queue; each thread
    opens its own client (tritonclient's HTTP client works only on the thread that made it)."""
    latencies: list[float] = []
    lock = threading.Lock()
    items = list(work)
    items.reverse()  # pop() from the end hands them out in order
    failures: list[BaseException] = []

    def worker() -> None:
        client = None
        try:
            client = open_client()
            while True:
                with lock:
                    if not items or failures:
                        return
                    item = items.pop()
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
    return Samples(latencies, time.perf_counter() - started)


# --- the in-process floor, in a process of its own ----------------------------------------------------------


def inprocess_worker() -> None:
    """Run by ``--inprocess-worker``: for each line ``{"family": …, "plan": …}`` on stdin, that family's
    service handed batches of 1, 2, 4 and 8 requests at each size; one JSON line of samples on stdout."""
    import torch

    from diffusers_backend.loading import Placement
    from diffusers_backend.service import DiffusersService
    from diffusers_backend.settings import ModelSettings
    from diffusers_backend.tiny import build_tiny_models

    folders = build_tiny_models(TINY_PIPELINES)
    loaded: tuple[str, DiffusersService] | None = None
    for line in sys.stdin:
        command = json.loads(line)
        family, plan = command["family"], Plan(**{**command["plan"], "sides": tuple(command["plan"]["sides"])})
        if loaded is None or loaded[0] != family:
            loaded = None  # one family in memory at a time
            loaded = (family, DiffusersService.load(
                ModelSettings(TINY_PREFIX + family, model_source=str(folders[family])), Placement("CPU")))
        service = loaded[1]
        sizes: dict[str, Any] = {}
        for side in plan.sides:
            service.execute([plan.requests(1, side)[0].arrays()])  # warm-up at this size
            levels = {}
            for concurrency in CONCURRENCY:
                work = plan.requests(concurrency, side)
                latencies = []
                started = time.perf_counter()
                for first in range(0, len(work), concurrency):
                    batch = [request.arrays() for request in work[first:first + concurrency]]
                    begun = time.perf_counter()
                    service.execute(batch)
                    latencies += [time.perf_counter() - begun] * len(batch)  # each waits for its whole batch
                levels[str(concurrency)] = asdict(Samples(latencies, time.perf_counter() - started))
            sizes[str(side)] = levels
        del service  # only `loaded` keeps it, so that loading the next family frees this one first
        print(json.dumps({"torch_threads": torch.get_num_threads(), "sizes": sizes}), flush=True)


class FloorWorker:
    """The in-process floor's own process. It keeps its pipeline loaded between phases and waits on stdin,
    using no CPU, while a server runs."""

    def __init__(self) -> None:
        command = [sys.executable, "-m", "workbench.loadtest", "--inprocess-worker"]
        # The server's malloc settings too: the floor is the same code in the same conditions, minus Triton.
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env=with_malloc_tunables(dict(os.environ)))

    def __enter__(self) -> FloorWorker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()  # the worker's loop ends at end of input
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:  # stuck mid-measurement (the suite failed meanwhile): do not wait on
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def measure(self, family: str, plan: Plan) -> dict[str, Any]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(json.dumps({"family": family, "plan": asdict(plan)}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the in-process worker stopped (exit status {self.process.wait(timeout=60)})")
        return dict(json.loads(line))


def pooled_floor(phases: Sequence[dict[str, Any]], side: int) -> list[dict[str, Any]]:
    levels = []
    for concurrency in CONCURRENCY:
        parts = [Samples(**phase["sizes"][str(side)][str(concurrency)]) for phase in phases]
        pooled = Samples([value for part in parts for value in part.latencies], sum(part.wall_s for part in parts))
        levels.append(asdict(pooled.level(concurrency)))
    return levels


# --- through Triton and through the capability layer ---------------------------------------------------------


def model_statistics(client: Any, server: TritonServer, model: str) -> dict[str, float]:
    """Triton's cumulative per-model counters: requests, and nanoseconds by stage."""
    stats = client.get_inference_statistics(model, headers=server.headers)["model_stats"][0]["inference_stats"]
    figures = {stage: float(stats[stage]["ns"]) for stage in ("success", "queue", "compute_infer")}
    figures["count"] = float(stats["success"]["count"])
    return figures


def breakdown(before: dict[str, float], after: dict[str, float], client_latencies: Sequence[float]) -> dict[str, float]:
    """Where a lone request's time went: the client's mean against Triton's own per-request means."""
    count = after["count"] - before["count"]

    def mean_ms(stage: str) -> float:
        return (after[stage] - before[stage]) / count / 1e6

    client_ms = statistics.mean(client_latencies) * 1000
    return {
        "client_mean_ms": round(client_ms, 2),
        "server_total_ms": round(mean_ms("success"), 2),
        "model_execute_ms": round(mean_ms("compute_infer"), 2),
        "queue_ms": round(mean_ms("queue"), 2),
        "http_and_client_ms": round(client_ms - mean_ms("success"), 2),
    }


def measure_served(server: TritonServer, model: str, plan: Plan) -> dict[str, Any]:
    """Through Triton and through the capability layer, at every size and concurrency of ``plan``."""
    from capability import CapabilityLayer

    results: dict[str, Any] = {}
    with CapabilityLayer(server.options.state_dir) as layer, server.http_client() as statistics_client:
        authority = layer.create_authority("bench")
        handle = layer.mint("bench", authority.id, {"server_url": server.url, "default_model": model,
                                                    "max_concurrent": max(CONCURRENCY)})

        def via_triton(client: Any, request: contract.TextToImage) -> object:
            return client.infer(model, triton.http_inputs(request), outputs=triton.http_outputs(),
                                headers=server.headers)

        def via_capability(_client: Any, request: contract.TextToImage) -> object:
            return handle.text_to_image(request.prompt, {
                "width": request.width, "height": request.height,
                "numInferenceSteps": request.num_inference_steps, "seed": request.seed})

        def open_triton_client() -> Any:
            return server.http_client(timeout_s=600)

        for side in plan.sides:
            warm_up = plan.requests(1, side)[:1]
            run_concurrently(1, warm_up, via_triton, open_triton_client)
            run_concurrently(1, warm_up, via_capability)
            entry: dict[str, Any] = {"triton": [], "capability": []}
            for concurrency in CONCURRENCY:
                work = plan.requests(concurrency, side)
                before = model_statistics(statistics_client, server, model)
                samples = run_concurrently(concurrency, work, via_triton, open_triton_client)
                if concurrency == 1:
                    entry["triton_c1_breakdown"] = breakdown(
                        before, model_statistics(statistics_client, server, model), samples.latencies)
                entry["triton"].append(asdict(samples.level(concurrency)))
                entry["capability"].append(asdict(run_concurrently(concurrency, work, via_capability)
                                                  .level(concurrency)))
            results[str(side)] = entry
        layer.generator.close()  # each thread's capability-layer connection, before the server stops
    return results


def server_memory(server: TritonServer) -> dict[str, Any]:
    """Resident memory of tritonserver and its Python stubs (one per model instance). PSS splits shared pages
    among the processes that share them, so the PSS total is what the whole server costs the machine; a
    stub's USS (pages no other process has) is what one more instance adds."""
    import psutil

    assert server.process is not None
    root = psutil.Process(server.process.pid)
    stubs = [child for child in root.children(recursive=True) if "triton_python_backend_stub" in child.name()]
    mib = 2**20
    stub_memory = [stub.memory_full_info() for stub in stubs]
    root_memory = root.memory_full_info()
    return {
        "instances": len(stubs),
        "tritonserver_rss_mib": round(root_memory.rss / mib),
        "stub_rss_mib": round(statistics.mean(memory.rss for memory in stub_memory) / mib),
        "total_pss_mib": round((root_memory.pss + sum(memory.pss for memory in stub_memory)) / mib),
        "per_extra_instance_uss_mib": round(statistics.mean(memory.uss for memory in stub_memory) / mib),
    }


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
                for name in ("torch", "diffusers", "transformers", "numpy", "tritonclient", "isal")}
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "versions": versions,
            "commit": commit, "date": time.strftime("%Y-%m-%d")}


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
        for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
            y = top + height - height * fraction
            draw.line([left - 4, y, left, y], fill=(0, 0, 0))
            draw.text((left - 34, y - 6), f"{peak * fraction:.0f}", fill=(0, 0, 0))
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


def run_suite(plan: Plan, png_iterations: int = 10) -> dict[str, Any]:
    from .bench import png_comparison

    print(f"PNG + base64 against Pillow ({png_iterations} alternating runs per image)…", flush=True)
    png = png_comparison(png_iterations)
    sizes = ", ".join(f"{side}x{side}" for side in plan.sides)
    families: dict[str, Any] = {}
    torch_threads = None
    with FloorWorker() as floor, tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        for family in FAMILY_MODELS:
            model = TINY_PREFIX + family
            print(f"{model} ({sizes}, {plan.steps} steps): in-process, through Triton and the capability "
                  "layer, in-process again…", flush=True)
            phases = [floor.measure(family, plan.half())]
            # The plain models only: the streaming variant's stub would be one more process in every figure.
            repository = build_tiny_repository(Path(scratch) / family / "repository", families=(family,),
                                               streaming=())
            with TritonServer(loopback_options(repository, Path(scratch) / family / "state")) as server:
                served = measure_served(server, model, plan)
            phases.append(floor.measure(family, plan.half()))
            torch_threads = phases[0]["torch_threads"]
            for side in plan.sides:
                levels = {"inprocess": pooled_floor(phases, side), "triton": served[str(side)]["triton"],
                          "capability": served[str(side)]["capability"]}
                figures = {"levels": levels, "ratios": ratios(levels),
                           "triton_c1_breakdown": served[str(side)]["triton_c1_breakdown"]}
                if side == plan.sides[0]:
                    families[model] = figures
                else:
                    families[model].setdefault("larger_sizes", {})[f"{side}x{side}"] = figures
        print("every family on one server: start-up and memory…", flush=True)
        started = time.perf_counter()
        all_repository = build_tiny_repository(Path(scratch) / "all" / "repository", streaming=())
        with TritonServer(loopback_options(all_repository, Path(scratch) / "all" / "state")) as server:
            startup_s = time.perf_counter() - started
            memory = server_memory(server)

    results: dict[str, Any] = {
        "machine": {**machine(), "torch_threads": torch_threads},
        "settings": {**asdict(plan), "concurrency": list(CONCURRENCY), "paths": list(PATHS)},
        "png_vs_pillow_1024": png["png_vs_pillow_1024"],
        "server": {"startup_to_ready_s": round(startup_s, 2), "memory": memory},
        "png": png,
        "families": families,
    }
    for key, name in FOLDED_FILES.items():
        if (RESULTS_DIR / name).is_file():
            results[key] = json.loads((RESULTS_DIR / name).read_text())
    return results


def print_table(results: dict[str, Any]) -> None:
    side = results["settings"]["sides"][0]
    print(f"\n{side}x{side}, {results['settings']['steps']} steps; in-process at c=N means batches of N")
    print("\n| model | path | " + " | ".join(f"c={c} p50 / img/s" for c in CONCURRENCY) + " |")
    print("|---|---|" + "---|" * len(CONCURRENCY))
    for model, entry in results["families"].items():
        for path in PATHS:
            cells = " | ".join(f"{level['p50_ms']:.0f} ms / {level['throughput_per_s']:.1f}"
                               for level in entry["levels"][path])
            print(f"| {model} | {path} | {cells} |")
    names = list(next(iter(results["families"].values()))["ratios"])
    print("\n| model | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for model, entry in results["families"].items():
        print(f"| {model} | " + " | ".join(f"{value:.2f}" for value in entry["ratios"].values()) + " |")
    print("\nThrough Triton at c=1, mean per request (Triton's statistics against the client's clock):")
    print("\n| model | client | Triton's total | model.execute | queue | HTTP + tritonclient |")
    print("|---|---|---|---|---|---|")
    for model, entry in results["families"].items():
        figures = entry["triton_c1_breakdown"]
        print(f"| {model} | {figures['client_mean_ms']:.1f} ms | {figures['server_total_ms']:.1f} ms | "
              f"{figures['model_execute_ms']:.1f} ms | {figures['queue_ms']:.2f} ms | "
              f"{figures['http_and_client_ms']:.1f} ms |")
    for model, entry in results["families"].items():
        for size, figures in entry.get("larger_sizes", {}).items():
            print(f"{model} {size}: " + ", ".join(f"{name} {value:.2f}" for name, value in figures["ratios"].items()))
    server = results["server"]
    memory = server["memory"]
    print(f"\nserver: READY in {server['startup_to_ready_s']:.1f} s; {memory['instances']} instances; "
          f"total PSS {memory['total_pss_mib']} MiB; each extra instance {memory['per_extra_instance_uss_mib']} MiB "
          f"(USS); tritonserver itself {memory['tritonserver_rss_mib']} MiB RSS")
    png = results["png"]["images"]["1024x1024 photo-like"]
    print(f"PNG + base64, 1024² photo-like: {png['ours_ms']:.1f} ms vs Pillow {png['pillow_ms']:.0f} ms "
          f"(png_vs_pillow_1024 = {results['png_vs_pillow_1024']:.3f})")


def print_report(results: dict[str, Any]) -> None:
    """Everything in a results.json as the Markdown tables docs/measurements.md shows."""
    machine_figures = results["machine"]
    print(f"{machine_figures['date']}, commit {machine_figures['commit'][:10]}: {machine_figures['cpus']} CPUs "
          f"({machine_figures['cpu']}), torch {machine_figures['versions']['torch']} with "
          f"{machine_figures['torch_threads']} threads, Python {machine_figures['python']}")
    print_table(results)
    print()
    from .bench import print_png_table

    print_png_table(results["png"])
    knobs = results.get("knobs")
    if knobs:
        for model, settings in knobs["models"].items():
            print(f"\n| {model}, {knobs['settings']['sides'][0]}², {knobs['settings']['steps']} steps | "
                  + " | ".join(f"c={c}" for c in CONCURRENCY) + " |")
            print("|---|" + "---|" * len(CONCURRENCY))
            for name, entry in settings.items():
                print(f"| {name} | " + " | ".join(f"{level['p50_ms']:.0f} ms, {level['throughput_per_s']:.1f}/s"
                                                 for level in entry["levels"]) + " |")
    perf = results.get("perf_analyzer")
    if perf:
        print("\n| perf_analyzer | " + " | ".join(f"c={c}" for c in CONCURRENCY) + " |")
        print("|---|" + "---|" * len(CONCURRENCY))
        for model, levels in perf["families"].items():
            shown = [level for level in levels if level["concurrency"] in CONCURRENCY]
            print(f"| {model} | " + " | ".join(f"{level['throughput_per_s']:.1f}/s, p50 {level['p50_ms']:.0f} ms"
                                               for level in shown) + " |")


def write_results(results: dict[str, Any]) -> None:
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    draw_throughput(results, RESULTS_DIR / "throughput.png")


def fold_into_results(key: str, figures: dict[str, Any]) -> None:
    """Write ``figures`` to its own file and, when a suite result exists, into it under ``key``."""
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / FOLDED_FILES[key]).write_text(json.dumps(figures, indent=2) + "\n")
    results_file = RESULTS_DIR / "results.json"
    if results_file.is_file():
        results = json.loads(results_file.read_text())
        results[key] = figures
        results_file.write_text(json.dumps(results, indent=2) + "\n")


def main_suite(plan: Plan) -> int:
    results = run_suite(plan)
    write_results(results)
    print_table(results)
    print(f"\nwrote {RESULTS_DIR / 'results.json'} and {RESULTS_DIR / 'throughput.png'}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--inprocess-worker"]:
        inprocess_worker()
        sys.exit(0)
    sys.exit(main_suite(DEFAULT))
