"""``scripts/bench``: the benchmark suite (see :mod:`.loadtest`), the PNG encoder comparison, and the sweep of
batching and instance settings (see :mod:`.knobs`). Compare ratios, not absolute numbers across runs: these
machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any


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


def png_comparison(iterations: int) -> dict[str, Any]:
    """capability's PNG + base64 against Pillow's default ``save(format="PNG")`` (no base64), on noise (what
    the tiny models make) and on a smooth, photo-like gradient with grain, at 256², 512² and 1024².

    ``png_vs_pillow_1024`` is our time over Pillow's on the 1024² photo-like image, the slower case for both."""
    import io

    import numpy as np
    from PIL import Image

    from capability.png import encode_png, encode_png_base64

    def pillow(image: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    generator = np.random.default_rng(0)
    figures: dict[str, Any] = {}
    for side in (256, 512, 1024):
        ramp = np.linspace(0, 255, side)
        smooth = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, ramp[::-1]) / 2,
                           np.outer(np.sin(ramp / 40) + 1, np.ones(side)) * 100], axis=-1)
        photo_like = np.clip(smooth + generator.normal(0, 3, smooth.shape), 0, 255).astype(np.uint8)
        noise = generator.integers(0, 256, (side, side, 3), dtype=np.uint8)
        for name, image in (("noise", noise), ("photo-like", photo_like)):
            samples = timed_side_by_side(partial(pillow, image), partial(encode_png_base64, image), iterations)
            theirs, ours = statistics.median(samples[0]), statistics.median(samples[1])
            figures[f"{side}x{side} {name}"] = {
                "pillow_ms": round(theirs * 1000, 2), "ours_ms": round(ours * 1000, 2),
                "speed_up": round(theirs / ours, 1),
                "pillow_kib": len(pillow(image)) // 1024, "ours_png_kib": len(encode_png(image)) // 1024,
            }
    photo = figures["1024x1024 photo-like"]
    return {"png_vs_pillow_1024": round(photo["ours_ms"] / photo["pillow_ms"], 4), "images": figures}


def print_png_table(png: dict[str, Any]) -> None:
    print("| image | Pillow default (PNG) | capability (PNG + base64) | speed-up | PNG size, Pillow → ours |")
    print("|---|---|---|---|---|")
    for name, figures in png["images"].items():
        print(f"| {name} | {figures['pillow_ms']:.1f} ms | {figures['ours_ms']:.1f} ms | {figures['speed_up']:.0f}x | "
              f"{figures['pillow_kib']} → {figures['ours_png_kib']} KiB |")


def main(argv: list[str] | None = None) -> int:
    from . import loadtest

    parser = argparse.ArgumentParser(prog="scripts/bench", description=loadtest.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer requests per level (a few minutes)")
    size.add_argument("--full", action="store_true", help="also 512x512, at the default request counts")
    parser.add_argument("--png", action="store_true", help="only compare PNG encoders (no server)")
    parser.add_argument("--knobs", action="store_true",
                        help="serve tiny models under several batching and instance settings (bench/knobs.json)")
    parser.add_argument("--stores", action="store_true",
                        help="what each capability store (SQLite, PostgreSQL) adds to a generation, and slot "
                             "turnover under 16 processes (bench/stores.json)")
    parser.add_argument("--replicas", action="store_true",
                        help="two replicas behind the Helm chart's HAProxy: the proxy's added latency, the spread, "
                             "a drain and a kill under load (bench/replicas.json)")
    parser.add_argument("--service", action="store_true",
                        help="the HTTP service against the Python API it wraps: added latency at c=1, throughput "
                             "ratio at c=8 (bench/service.json)")
    parser.add_argument("--iterations", type=int, default=10, help="with --png: timed encodes per image")
    parser.add_argument("--report", action="store_true",
                        help="print the tables of bench/results.json (with knobs and perf_analyzer) and exit")
    arguments = parser.parse_args(argv)
    if arguments.report:
        loadtest.print_report(json.loads((loadtest.RESULTS_DIR / "results.json").read_text()))
        return 0
    if arguments.png:
        print_png_table(png_comparison(arguments.iterations))
        return 0
    # Benchmarks of their own, each with its own set-up: imported only when asked for.
    for flag, module in (("stores", "store_bench"), ("service", "service_bench"), ("replicas", "replica_bench")):
        if getattr(arguments, flag):
            bench_main: Callable[[list[str]], int] = importlib.import_module(f"{__package__}.{module}").main
            return bench_main([])
    if arguments.knobs:
        from .knobs import knob_sweep

        return knob_sweep(quick=arguments.quick)
    plan = loadtest.QUICK if arguments.quick else loadtest.FULL if arguments.full else loadtest.DEFAULT
    return loadtest.main_suite(plan)


if __name__ == "__main__":
    sys.exit(main())
