"""``scripts/bench``: start-up time of ``scripts/serve --tiny``, and one generation's latency per family through
Triton and in-process, measured side by side in one run (these machines are shared and noisy: compare the
ratio, not the absolute numbers across runs).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from . import contract
from .repository import FAMILY_MODELS, TINY_PREFIX, build_tiny_repository
from .server import TritonServer, free_ports, loopback_options


def time_to_ready(repository: Path) -> float:
    """Seconds from launching ``python -m triton_launcher --tiny`` (the models already built) to its READY line."""
    with tempfile.TemporaryDirectory(prefix="bench-state-") as state_dir:
        http_port, grpc_port, metrics_port = free_ports(3)
        command = [sys.executable, "-m", "triton_launcher", "--tiny", "--http-port", str(http_port),
                   "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--state-dir", state_dir]
        started = time.perf_counter()
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as launcher:
            assert launcher.stdout is not None
            line = launcher.stdout.readline()
            elapsed = time.perf_counter() - started
            launcher.terminate()
            launcher.wait(timeout=120)
        if not line.startswith("READY"):
            raise RuntimeError(f"scripts/serve --tiny did not print READY (got {line!r})")
    return elapsed


def timed_side_by_side(first: Callable[[], object], second: Callable[[], object],
                       iterations: int) -> tuple[list[float], list[float]]:
    """Alternate the two so that a burst of load on the machine hits both alike."""
    first(), second()  # warm-up: first calls pay for lazy initialisation
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(iterations):
        for function, sink in ((first, samples[0]), (second, samples[1])):
            started = time.perf_counter()
            function()
            sink.append(time.perf_counter() - started)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument("--iterations", type=int, default=10, help="timed generations per family and path")
    parser.add_argument("--startups", type=int, default=3, help="timed launches of scripts/serve --tiny")
    parser.add_argument("--side", type=int, default=256, help="image width and height (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (default: %(default)s)")
    parser.add_argument("--png", action="store_true", help="only compare PNG encoders (no server)")
    parser.add_argument("--suite", action="store_true",
                        help="latency and throughput at concurrency 1-8 on every path (bench/results.json)")
    parser.add_argument("--quick", action="store_true", help="with --suite: fewer requests per level")
    parser.add_argument("--knobs", action="store_true",
                        help="tiny-sd15 through Triton under several instance counts and CPU thread settings")
    arguments = parser.parse_args(argv)
    if arguments.knobs:
        from .loadtest import knob_sweep

        return knob_sweep(side=arguments.side, steps=arguments.steps)
    if arguments.suite:
        from .loadtest import main_suite

        return main_suite(arguments.quick, arguments.side, arguments.steps)
    if arguments.png:
        png_encoders(arguments.iterations)
        return 0

    from diffusers_backend.loading import Placement
    from diffusers_backend.service import DiffusersService
    from diffusers_backend.settings import ModelSettings
    from diffusers_backend.tiny import build_tiny_models

    from .paths import TINY_PIPELINES

    repository = build_tiny_repository()
    folders = build_tiny_models(TINY_PIPELINES)
    print(f"# scripts/bench: {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; {arguments.side}x{arguments.side}, {arguments.steps} steps, "
          f"median of {arguments.iterations} after a warm-up\n")

    startups = [time_to_ready(repository) for _ in range(arguments.startups)]
    print(f"scripts/serve --tiny to READY (models cached): {', '.join(f'{s:.1f} s' for s in startups)} "
          f"(median {statistics.median(startups):.1f} s)\n")

    request = contract.TextToImage("a lighthouse on a cliff at dawn", width=arguments.side, height=arguments.side,
                                   num_inference_steps=arguments.steps, seed=7)
    print("| model | through Triton (HTTP) | in-process | Triton / in-process |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-state-") as state_dir:
        options = loopback_options(repository, Path(state_dir))
        with TritonServer(options) as server, server.http_client() as client:
            for family in FAMILY_MODELS:
                model = TINY_PREFIX + family
                service = DiffusersService.load(
                    ModelSettings(model, model_source=str(folders[family])), Placement("CPU")
                )
                arrays = request.arrays()

                def through_triton(model: str = model) -> object:
                    return client.infer(model, request.http_inputs(), outputs=contract.http_outputs(),
                                        headers=server.headers)

                def in_process(service: DiffusersService = service, arrays: Any = arrays) -> object:
                    return service.execute([arrays])

                triton_samples, local_samples = timed_side_by_side(through_triton, in_process, arguments.iterations)
                triton_median, local_median = statistics.median(triton_samples), statistics.median(local_samples)
                print(f"| {model} | {triton_median * 1000:.0f} ms | {local_median * 1000:.0f} ms | "
                      f"{triton_median / local_median:.2f} |", flush=True)
            capability_overhead(server, client, request, arguments.iterations)
    return 0


def png_encoders(iterations: int) -> None:
    """capability/png.py against Pillow's default PNG writer, on noise (what the tiny models make) and on a
    smooth, photo-like gradient with grain."""
    import io

    import numpy as np
    from PIL import Image

    from capability.png import encode_png

    def pillow(image: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    generator = np.random.default_rng(0)
    print("| image | Pillow default | capability/png.py | speed-up | size, Pillow → ours |")
    print("|---|---|---|---|---|")
    for side in (256, 512, 1024):
        ramp = np.linspace(0, 255, side)
        smooth = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, ramp[::-1]) / 2,
                           np.outer(np.sin(ramp / 40) + 1, np.ones(side)) * 100], axis=-1)
        photo_like = np.clip(smooth + generator.normal(0, 3, smooth.shape), 0, 255).astype(np.uint8)
        noise = generator.integers(0, 256, (side, side, 3), dtype=np.uint8)
        for name, image in (("noise", noise), ("photo-like", photo_like)):
            samples = timed_side_by_side(partial(pillow, image), partial(encode_png, image), iterations)
            theirs, ours = statistics.median(samples[0]), statistics.median(samples[1])
            print(f"| {name} {side}² | {theirs * 1000:.1f} ms | {ours * 1000:.1f} ms | {theirs / ours:.1f}x | "
                  f"{len(pillow(image)) // 1024} → {len(encode_png(image)) // 1024} KiB |", flush=True)


def capability_overhead(server: TritonServer, client: Any, request: contract.TextToImage, iterations: int) -> None:
    """textToImage through the capability layer (checks, store, lease, audit, PNG) against the same request
    sent straight with tritonclient."""
    from capability import CapabilityLayer

    model = TINY_PREFIX + "sd15"
    options = {"width": request.width, "height": request.height, "numInferenceSteps": request.num_inference_steps,
               "seed": request.seed}
    with CapabilityLayer(server.options.state_dir) as layer:
        authority = layer.create_authority("bench")
        handle = layer.mint("bench", authority.id, {"server_url": server.url, "default_model": model,
                                                    "max_concurrent": 4, "max_width": 1024, "max_height": 1024,
                                                    "max_steps": 50})
        delegated = handle.delegate({"max_steps": 10})  # a chain of three links to re-check at each use

        def direct() -> object:
            return client.infer(model, request.http_inputs(), outputs=contract.http_outputs(),
                                headers=server.headers)

        def through_capability() -> object:
            return delegated.text_to_image(request.prompt, options)

        direct_samples, capability_samples = timed_side_by_side(direct, through_capability, iterations)
    direct_median, capability_median = statistics.median(direct_samples), statistics.median(capability_samples)
    print(f"\n| {model}, one request | direct tritonclient | capability textToImage | overhead | ratio |")
    print("|---|---|---|---|---|")
    print(f"| {request.width}x{request.height}, {request.num_inference_steps} steps | {direct_median * 1000:.0f} ms | "
          f"{capability_median * 1000:.0f} ms | {(capability_median - direct_median) * 1000:.1f} ms | "
          f"{capability_median / direct_median:.2f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
