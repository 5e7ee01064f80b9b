"""``scripts/bench-gpu``: the four families at their real size on a GPU, in-process against through Triton.

No weights can be downloaded on the lent GPU machines, so each family is built with random weights and its
real architecture (:mod:`diffusers_backend.full_size`), saved once to a scratch folder, and served from there
by the real ``model.py``. For each family and variant (eager; ``channels_last``; ``torch_compile``; an
``attention_backend``, all config parameters) it measures, at the family's native size and steps
(SD1.5 512² 50 steps, SDXL 1024² 30, SD3 1024² 28, FLUX.1-schnell 1024² 4):

- ``inprocess``: the same ``DiffusersService`` that ``model.py`` drives, in this process, no server running;
- ``triton``: one request at a time through tritonserver with ``tritonclient``, the model alone on the GPU.

Writes ``bench/gpu-results.json`` (card, versions, per family and variant the medians and their ratio) and
prints a table. ``--tiny-cpu`` runs the same flow on the tiny models on the CPU (small sizes, few steps), so
that the script itself is tested where there is no GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference_client import contract, triton
from triton_launcher.installation import with_malloc_tunables
from triton_launcher.paths import MODEL_REPOSITORY, TINY_PIPELINES
from triton_launcher.repository import FAMILY_MODELS, with_cpu_instances, with_parameters
from triton_launcher.server import TritonServer, loopback_options

from .loadtest import RESULTS_DIR, machine

NATIVE = {"sd15": (512, 50), "sdxl": (1024, 30), "sd3": (1024, 28), "flux": (1024, 4)}
"""Side and steps each family is published and benchmarked at (diffusers' own figures use these)."""
TINY_CPU = (64, 2)


@dataclass(frozen=True)
class Variant:
    name: str
    parameters: dict[str, str] = field(default_factory=dict)


VARIANTS = {
    "eager": Variant("eager"),
    "channels_last": Variant("channels_last", {"channels_last": "true"}),
    "compile": Variant("compile", {"torch_compile": "max-autotune-no-cudagraphs"}),
    "cudnn_attention": Variant("cudnn_attention", {"attention_backend": "_native_cudnn"}),
}


def pipeline_folder(family: str, scratch: Path, tiny_cpu: bool) -> Path:
    """A saved pipeline to serve: the tiny one, or the full-size random one built on the GPU and saved."""
    if tiny_cpu:
        from diffusers_backend.tiny import build_tiny_models

        return build_tiny_models(TINY_PIPELINES, (family,))[family]
    import torch

    from diffusers_backend.full_size import build_full_size_pipeline

    dtype = torch.bfloat16 if family == "flux" else torch.float16
    folder = scratch / "pipelines" / family
    if not (folder / "model_index.json").is_file():
        started = time.perf_counter()
        pipeline = build_full_size_pipeline(family, dtype=dtype, device="cuda")
        pipeline.save_pretrained(folder)
        del pipeline
        _free_gpu_memory()
        print(f"{family}: built and saved in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def model_config(family: str, folder: Path, model_directory: Path, variant: Variant, tiny_cpu: bool) -> str:
    """The real config.pbtxt, served from ``folder`` with ``variant``'s parameters."""
    text = (MODEL_REPOSITORY / family / "config.pbtxt").read_text()
    if tiny_cpu:
        text = with_cpu_instances(text, 1)
    changes: dict[str, str | None] = {"model_source": os.path.relpath(folder, model_directory), "variant": None,
                                      **variant.parameters}
    return with_parameters(text, changes)


def timed(call: Callable[[], object], iterations: int) -> list[float]:
    call()  # warm-up (and, with torch_compile, the rest of the compilation)
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def measure_inprocess(family: str, folder: Path, variant: Variant, request: contract.TextToImage, *,
                      iterations: int, tiny_cpu: bool) -> list[float]:
    """In a fresh process each time: attention backends and compiled graphs are process-wide state, and a
    process that ends gives all its GPU memory back."""
    job = {"family": family, "folder": str(folder), "parameters": variant.parameters, "tiny_cpu": tiny_cpu,
           "iterations": iterations, "request": {"prompt": request.prompt, "width": request.width,
                                                 "height": request.height, "steps": request.num_inference_steps,
                                                 "seed": request.seed}}
    finished = subprocess.run([sys.executable, "-m", "workbench.gpu_bench", "--inprocess-worker",
                               json.dumps(job)], capture_output=True, text=True, check=False, timeout=3600,
                              env=with_malloc_tunables(dict(os.environ)))  # as the server's stubs have
    if finished.returncode != 0:
        raise RuntimeError(finished.stderr.strip().splitlines()[-1] if finished.stderr.strip() else "no output")
    return list(json.loads(finished.stdout.strip().splitlines()[-1]))


def inprocess_worker(job: dict[str, Any]) -> list[float]:
    from diffusers_backend.loading import Placement
    from diffusers_backend.service import DiffusersService
    from diffusers_backend.settings import ModelSettings

    settings = ModelSettings.from_parameters({key: {"string_value": value} for key, value in {
        "model_id": job["family"], "model_source": job["folder"], **job["parameters"]}.items()})
    service = DiffusersService.load(settings, Placement("CPU" if job["tiny_cpu"] else "GPU"))
    fields = job["request"]
    arrays = contract.TextToImage(fields["prompt"], width=fields["width"], height=fields["height"],
                                  num_inference_steps=fields["steps"], seed=fields["seed"]).arrays()
    return timed(lambda: service.execute([arrays]), job["iterations"])


def measure_triton(family: str, folder: Path, variant: Variant, request: contract.TextToImage, *,
                   iterations: int, scratch: Path, tiny_cpu: bool) -> list[float]:
    repository = scratch / f"repository-{family}-{variant.name}"
    shutil.rmtree(repository, ignore_errors=True)
    model_directory = repository / family
    (model_directory / "1").mkdir(parents=True)
    (model_directory / "config.pbtxt").write_text(model_config(family, folder, model_directory, variant, tiny_cpu))
    shutil.copy(MODEL_REPOSITORY / family / "1" / "model.py", model_directory / "1" / "model.py")
    with TritonServer(loopback_options(repository, scratch / f"state-{family}-{variant.name}")) as server, \
            server.http_client(timeout_s=3600) as client:
        return timed(lambda: client.infer(family, triton.http_inputs(request), outputs=triton.http_outputs(),
                                          headers=server.headers), iterations)


def run(families: list[str], variants: list[str], iterations: int, tiny_cpu: bool, scratch: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": {**machine(), "device": _device_name(tiny_cpu)},
                               "settings": {"iterations": iterations, "tiny_cpu": tiny_cpu}, "families": {}}
    for family in families:
        side, steps = TINY_CPU if tiny_cpu else NATIVE[family]
        request = contract.TextToImage("a lighthouse on a cliff at dawn, oil painting", width=side, height=side,
                                       num_inference_steps=steps, seed=7)
        folder = pipeline_folder(family, scratch, tiny_cpu)
        for name in variants:
            variant = VARIANTS[name]
            try:
                local = measure_inprocess(family, folder, variant, request, iterations=iterations, tiny_cpu=tiny_cpu)
                served = measure_triton(family, folder, variant, request, iterations=iterations, scratch=scratch,
                                        tiny_cpu=tiny_cpu)
            except Exception as error:  # one variant that cannot run here (a missing kernel) must not end the run
                print(f"{family} {name}: failed: {error}", flush=True)
                results["families"].setdefault(family, {})[name] = {"error": str(error)}
                continue
            figures = {"side": side, "steps": steps, "inprocess_p50_s": round(statistics.median(local), 4),
                       "triton_p50_s": round(statistics.median(served), 4)}
            figures["triton_vs_inprocess"] = round(figures["triton_p50_s"] / figures["inprocess_p50_s"], 4)
            results["families"].setdefault(family, {})[name] = figures
            print(f"| {family} {side}² {steps} steps | {name} | {figures['inprocess_p50_s']:.3f} s | "
                  f"{figures['triton_p50_s']:.3f} s | {figures['triton_vs_inprocess']:.3f} |", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench-gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILY_MODELS))
    parser.add_argument("--variants", default="eager", help=f"comma-separated, of {sorted(VARIANTS)}")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--tiny-cpu", action="store_true", help="tiny models on the CPU: tests this script")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="keep built pipelines here between runs (default: a temporary folder)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "gpu-results.json")
    arguments = parser.parse_args(argv)
    families = [family for family in arguments.families.split(",") if family]
    variants = [variant for variant in arguments.variants.split(",") if variant]
    unknown = sorted({*families} - set(FAMILY_MODELS)) + sorted({*variants} - set(VARIANTS))
    if unknown:
        parser.error(f"unknown {unknown}: families are {list(FAMILY_MODELS)}, variants {sorted(VARIANTS)}")
    print("| model | variant | in-process | through Triton | ratio |\n|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as temporary:
        scratch = arguments.scratch or Path(temporary)
        results = run(families, variants, arguments.iterations, arguments.tiny_cpu, scratch)
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {arguments.output}")
    return 0


def _device_name(tiny_cpu: bool) -> str:
    if tiny_cpu:
        return "cpu"
    import torch

    return str(torch.cuda.get_device_name(0))


def _free_gpu_memory() -> None:  # after building a full-size pipeline in this process
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--inprocess-worker"]:
        print(json.dumps(inprocess_worker(json.loads(sys.argv[2]))))
        sys.exit(0)
    sys.exit(main())
