"""``scripts/perf-analyzer``: Triton's own benchmark tool against the tiny models, with real prompts.

perf_analyzer 2.51 is the binary inside the ``tritonclient==2.51.0`` wheel (pyproject.toml's
``[tool.triton-diffusers.perf-analyzer]``; later releases ship none, and the client library itself is a newer
release): scripts/perf-analyzer unpacks it into the venv's ``bin/``. On a machine without CUDA it still needs
``libb64`` (Debian's ``libb64-0d``) and ``libcudart.so.12`` (the ``nvidia-cuda-runtime-cu12`` wheel of the
``[bench]`` extra), which scripts/perf-analyzer installs. Every request carries the infer key
(``-H infer-key:…``) and one of a few real prompts (``--input-data``). Figures go to
``bench/perf_analyzer.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from inference_client.state import INFER_KEY_HEADER
from triton_launcher.repository import FAMILY_MODELS, TINY_PREFIX, build_tiny_repository
from triton_launcher.server import LOOPBACK, TritonServer, loopback_options

from .loadtest import fold_into_results

PROMPTS = (
    "a lighthouse on a cliff at dawn, oil painting",
    "a red fox in fresh snow, golden hour",
    "a bowl of ramen on a wooden table, studio photo",
    "a paper boat on a rainy street, macro shot",
)


def input_data(side: int, steps: int) -> dict[str, Any]:
    """perf_analyzer's --input-data: one entry per prompt; shapes without the batch dimension."""
    return {"data": [{
        "PROMPT": {"content": [prompt], "shape": [1]},
        "WIDTH": {"content": [side], "shape": [1]},
        "HEIGHT": {"content": [side], "shape": [1]},
        "NUM_INFERENCE_STEPS": {"content": [steps], "shape": [1]},
        "SEED": {"content": [index], "shape": [1]},
    } for index, prompt in enumerate(PROMPTS)]}


def unpack_perf_analyzer(wheel: Path, bin_dir: Path) -> Path:
    """Take the ``perf_analyzer`` binary out of a tritonclient wheel into ``bin_dir`` (nothing else of it)."""
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        member = next((entry for entry in archive.infolist()
                       if entry.filename.endswith(".data/data/bin/perf_analyzer")), None)
        if member is None:
            raise RuntimeError(f"{wheel.name} holds no perf_analyzer binary")
        target = bin_dir / "perf_analyzer"
        temporary = target.with_suffix(".partial")
        temporary.write_bytes(archive.read(member))
        temporary.chmod(0o755)
        temporary.replace(target)
    return target


def perf_analyzer_environment() -> dict[str, str]:
    site_packages = Path(sysconfig.get_paths()["purelib"])
    cuda_runtime = site_packages / "nvidia" / "cuda_runtime" / "lib"
    environment = dict(os.environ)
    environment["LD_LIBRARY_PATH"] = os.pathsep.join(
        part for part in (str(cuda_runtime), environment.get("LD_LIBRARY_PATH", "")) if part)
    return environment


def run_perf_analyzer(server: TritonServer, model: str, data_file: Path, *, concurrency: str,
                      requests_per_window: int, report: Path) -> list[dict[str, Any]]:
    executable = shutil.which("perf_analyzer", path=str(Path(sys.executable).parent)) or "perf_analyzer"
    command = [
        executable, "-m", model, "-u", f"{LOOPBACK}:{server.options.http_port}", "-i", "http",
        "-H", f"{INFER_KEY_HEADER}:{server.infer_key}", "--input-data", str(data_file),
        "--concurrency-range", concurrency, "--measurement-mode", "count_windows",
        "--measurement-request-count", str(requests_per_window), "--max-trials", "8",
        # These machines are shared: accept windows within 25% of each other (perf_analyzer's default is 10%).
        "--stability-percentage", "25", "-f", str(report),
    ]
    finished = subprocess.run(command, capture_output=True, text=True, env=perf_analyzer_environment(),
                              timeout=1800, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed on {model} ({finished.returncode}):\n{finished.stdout[-2000:]}"
                           f"\n{finished.stderr[-2000:]}")
    with report.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [{
        "concurrency": int(row["Concurrency"]),
        "throughput_per_s": float(row["Inferences/Second"]),
        "p50_ms": int(row["p50 latency"]) / 1000,
        "p95_ms": int(row["p95 latency"]) / 1000,
        "p99_ms": int(row["p99 latency"]) / 1000,
        "server_queue_ms": int(row["Server Queue"]) / 1000,
        "server_compute_ms": int(row["Server Compute Infer"]) / 1000,
    } for row in rows]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--unpack"]:  # scripts/perf-analyzer's set-up: --unpack WHEEL
        print(unpack_perf_analyzer(Path(argv[1]), Path(sys.executable).parent))
        return 0
    parser = argparse.ArgumentParser(prog="scripts/perf-analyzer", description=__doc__)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--concurrency", default="1:8:1", help="perf_analyzer --concurrency-range (default: 1:8:1)")
    parser.add_argument("--requests-per-window", type=int, default=16)
    arguments = parser.parse_args(argv)

    repository = build_tiny_repository()
    results: dict[str, Any] = {"settings": vars(arguments), "families": {}}
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as scratch:
        data_file = Path(scratch) / "input-data.json"
        data_file.write_text(json.dumps(input_data(arguments.side, arguments.steps)))
        with TritonServer(loopback_options(repository, Path(scratch) / "state")) as server:
            for family in FAMILY_MODELS:
                model = TINY_PREFIX + family
                levels = run_perf_analyzer(server, model, data_file, concurrency=arguments.concurrency,
                                           requests_per_window=arguments.requests_per_window,
                                           report=Path(scratch) / f"{model}.csv")
                results["families"][model] = levels
                for level in levels:
                    print(f"{model} c={level['concurrency']}: {level['throughput_per_s']:.1f}/s, "
                          f"p50 {level['p50_ms']:.0f} ms, p95 {level['p95_ms']:.0f} ms, "
                          f"queue {level['server_queue_ms']:.1f} ms, compute {level['server_compute_ms']:.0f} ms",
                          flush=True)
    fold_into_results("perf_analyzer", results)
    print("wrote bench/perf_analyzer.json (and into bench/results.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
