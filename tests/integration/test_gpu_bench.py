"""scripts/bench-gpu's whole flow (build, in-process, through the real tritonserver, report), on the CPU with a
tiny model: the GPU run is the same code with the full-size pipelines."""

from __future__ import annotations

import json
from pathlib import Path

from workbench import gpu_bench


def test_bench_gpu_measures_inprocess_and_triton_and_records_failures_when_run_on_tiny_cpu_models(
    tmp_path: Path,
) -> None:
    output = tmp_path / "gpu-results.json"
    assert gpu_bench.main(["--tiny-cpu", "--families", "flux", "--variants", "eager,cudnn_attention",
                           "--iterations", "1", "--scratch", str(tmp_path / "scratch"), "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert results["machine"]["device"] == "cpu"
    eager = results["families"]["flux"]["eager"]
    assert (eager["side"], eager["steps"]) == gpu_bench.TINY_CPU
    assert eager["inprocess_p50_s"] > 0
    assert eager["triton_p50_s"] > 0
    assert eager["triton_vs_inprocess"] == round(eager["triton_p50_s"] / eager["inprocess_p50_s"], 4)
    # cuDNN attention cannot run on the CPU: that variant is recorded as failed, naming why, and the run goes on.
    assert "scaled_dot_product_attention" in results["families"]["flux"]["cudnn_attention"]["error"]
