"""``scripts/bench --knobs``: what each batching and instance setting does, through Triton, on tiny models.

Each setting is the shipped tiny config with a few lines changed; each runs on a server of its own with only
that model loaded, at concurrency 1, 2, 4 and 8. Figures go to ``bench/knobs.json`` (and into
``bench/results.json``) and a table on stdout.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from inference_client import contract, triton
from triton_launcher.paths import TINY_PIPELINES
from triton_launcher.repository import (
    TINY_CPU_INSTANCES,
    TINY_PREFIX,
    build_tiny_repository,
    with_cpu_instances,
    with_parameters,
)
from triton_launcher.server import TritonServer, loopback_options

from .loadtest import CONCURRENCY, Plan, fold_into_results, machine, run_concurrently


@dataclass(frozen=True)
class Knobs:
    instances: int = TINY_CPU_INSTANCES
    max_batch_size: int = 4
    queue_delay_us: int = 0
    preferred_batch_size: int | None = None
    parameters: dict[str, str] = field(default_factory=dict)

    def apply(self, config: str) -> str:
        config = with_cpu_instances(config, self.instances)
        config = re.sub(r"max_batch_size: \d+", f"max_batch_size: {self.max_batch_size}", config)
        batching = f"max_queue_delay_microseconds: {self.queue_delay_us}"
        if self.preferred_batch_size is not None:
            batching = f"preferred_batch_size: [ {self.preferred_batch_size} ]\n  {batching}"
        return with_parameters(re.sub(r"max_queue_delay_microseconds: \d+", batching, config), self.parameters)


SETTINGS = {
    "shipped: 2 instances sharing the cores, batches of up to 4, no queue delay": Knobs(),
    "1 instance": Knobs(instances=1),
    "1 instance, batches of up to 8, preferred 8, 2 ms queue delay": Knobs(
        instances=1, max_batch_size=8, preferred_batch_size=8, queue_delay_us=2000),
    "2 instances, 1 thread each (no sharing)": Knobs(parameters={"share_cpu_cores": "false", "cpu_threads": "1"}),
    "2 instances, every core each (no sharing)": Knobs(parameters={"share_cpu_cores": "false"}),
}


def measure(model: str, knobs: Knobs, plan: Plan) -> list[dict[str, Any]]:
    base = build_tiny_repository()
    with tempfile.TemporaryDirectory(prefix="bench-knobs-") as scratch:
        repository = Path(scratch) / "repository"
        shutil.copytree(base / model, repository / model)
        config = repository / model / "config.pbtxt"
        source = os.path.relpath(TINY_PIPELINES / model, config.parent)
        config.write_text(knobs.apply(with_parameters(config.read_text(), {"model_source": source})))
        with TritonServer(loopback_options(repository, Path(scratch) / "state")) as server:
            def call(client: Any, request: contract.TextToImage) -> object:
                return client.infer(model, triton.http_inputs(request), outputs=triton.http_outputs(),
                                    headers=server.headers)

            def open_client() -> Any:
                return server.http_client(timeout_s=600)

            side = plan.sides[0]
            run_concurrently(1, plan.requests(1, side)[:2], call, open_client)  # warm-up
            return [asdict(run_concurrently(concurrency, plan.requests(concurrency, side), call, open_client)
                           .level(concurrency)) for concurrency in CONCURRENCY]


def knob_sweep(families: tuple[str, ...] = ("sd15", "flux"), quick: bool = False) -> int:
    plan = Plan(rounds=2, solo_rounds=8) if quick else Plan(rounds=4, solo_rounds=16)
    results: dict[str, Any] = {"machine": machine(), "settings": {**asdict(plan), "concurrency": list(CONCURRENCY)},
                               "models": {}}
    for family in families:
        model = TINY_PREFIX + family
        print(f"\n| {model}, {plan.sides[0]}², {plan.steps} steps | "
              + " | ".join(f"c={c}" for c in CONCURRENCY) + " |")
        print("|---|" + "---|" * len(CONCURRENCY), flush=True)
        for name, knobs in SETTINGS.items():
            levels = measure(model, knobs, plan)
            results["models"].setdefault(model, {})[name] = {"knobs": asdict(knobs), "levels": levels}
            print(f"| {name} | " + " | ".join(f"{level['p50_ms']:.0f} ms, {level['throughput_per_s']:.1f}/s"
                                             for level in levels) + " |", flush=True)
    fold_into_results("knobs", results)
    print("\nwrote bench/knobs.json (and into bench/results.json)")
    return 0
