"""The arithmetic and plumbing of scripts/bench (no server)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from triton_launcher.paths import MODEL_REPOSITORY
from triton_launcher.repository import read_parameters
from workbench import loadtest
from workbench.knobs import Knobs
from workbench.loadtest import Plan, Samples, breakdown, pooled_floor, ratios, run_concurrently, summarize


def test_summarize_reports_median_p95_and_throughput_when_given_latencies() -> None:
    level = summarize(2, [0.1] * 19 + [1.0], wall_s=2.0)
    assert (level.requests, level.p50_ms, level.p95_ms, level.throughput_per_s) == (20, 100.0, 100.0, 10.0)
    assert summarize(1, [0.1, 0.2, 0.3, 0.4, 5.0], wall_s=1.0).p95_ms == 5000.0


def test_run_concurrently_serves_every_item_once_from_distinct_threads_with_own_clients() -> None:
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    class Client:
        closed = 0

        def close(self) -> None:
            with lock:
                Client.closed += 1

    def call(client: Client, item: int) -> None:
        with lock:
            seen.append((id(client), item))

    samples = run_concurrently(3, list(range(30)), call, Client)
    assert sorted(item for _, item in seen) == list(range(30))
    assert samples.level(3).requests == 30
    assert Client.closed == 3


def test_run_concurrently_raises_when_a_request_fails() -> None:
    def call(_client: object, item: int) -> None:
        if item == 5:
            raise ValueError("boom")

    with pytest.raises(RuntimeError, match="a request failed at concurrency 2"):
        run_concurrently(2, list(range(10)), call)


def test_ratios_compare_paths_and_concurrency_when_levels_are_complete() -> None:
    def level(concurrency: int, p50: float, throughput: float) -> dict[str, float]:
        return {"concurrency": concurrency, "p50_ms": p50, "throughput_per_s": throughput}

    levels = {
        "inprocess": [level(1, 100, 10), level(8, 400, 20)],
        "triton": [level(1, 102, 9.8), level(8, 420, 18)],
        "capability": [level(1, 105, 9.5), level(8, 430, 17)],
    }
    assert ratios(levels) == {"triton_vs_inprocess_c1": 1.02, "capability_vs_inprocess_c1": 1.05,
                              "throughput_c8_vs_c1": 1.837, "throughput_c8_vs_inprocess_batch8": 0.9}


def test_plan_gives_solo_rounds_at_concurrency_one_and_rounds_per_client_above() -> None:
    plan = Plan(sides=(256,), steps=4, rounds=3, solo_rounds=10)
    assert len(plan.requests(1, 256)) == 10
    eight = plan.requests(8, 512)
    assert len(eight) == 24
    assert len({request.seed for request in eight}) == 24
    assert {(request.width, request.height, request.num_inference_steps) for request in eight} == {(512, 512, 4)}
    assert plan.half() == Plan(sides=(256,), steps=4, rounds=1, solo_rounds=5)


def test_pooled_floor_merges_latencies_and_wall_time_of_both_phases() -> None:
    def phase(latency: float, wall: float) -> dict[str, object]:
        levels = {str(c): {"latencies": [latency] * c, "wall_s": wall} for c in loadtest.CONCURRENCY}
        return {"sizes": {"256": levels}}

    levels = pooled_floor([phase(0.1, 1.0), phase(0.3, 3.0)], 256)
    assert levels[0] == {"concurrency": 1, "requests": 2, "p50_ms": 200.0, "p95_ms": 300.0, "throughput_per_s": 0.5}
    assert levels[-1]["requests"] == 16


def test_breakdown_splits_a_lone_request_between_client_and_server() -> None:
    before = {"count": 10.0, "success": 0.0, "queue": 0.0, "compute_infer": 0.0}
    after = {"count": 12.0, "success": 84e6, "queue": 0.2e6, "compute_infer": 80e6}
    assert breakdown(before, after, [0.043, 0.045]) == {
        "client_mean_ms": 44.0, "server_total_ms": 42.0, "model_execute_ms": 40.0, "queue_ms": 0.1,
        "http_and_client_ms": 2.0}


def test_knobs_apply_rewrites_instances_batching_and_parameters_of_a_tiny_config() -> None:
    config = (MODEL_REPOSITORY / "sd15" / "config.pbtxt").read_text()
    config = config.replace("kind: KIND_GPU", "kind: KIND_CPU")
    changed = Knobs(instances=3, max_batch_size=8, queue_delay_us=2000, preferred_batch_size=8,
                    parameters={"cpu_threads": "1"}).apply(config)
    assert changed.count("kind: KIND_CPU count: 1") == 3
    assert changed.count("priority: 1000") == 2
    assert "max_batch_size: 8" in changed
    assert "preferred_batch_size: [ 8 ]\n  max_queue_delay_microseconds: 2000" in changed
    assert read_parameters(changed)["cpu_threads"] == "1"


def test_fold_into_results_writes_its_file_and_updates_results_when_a_suite_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loadtest, "RESULTS_DIR", tmp_path)
    loadtest.fold_into_results("knobs", {"a": 1})
    assert json.loads((tmp_path / "knobs.json").read_text()) == {"a": 1}
    assert not (tmp_path / "results.json").exists()
    (tmp_path / "results.json").write_text(json.dumps({"families": {}}))
    loadtest.fold_into_results("perf_analyzer", {"b": 2})
    assert json.loads((tmp_path / "results.json").read_text()) == {"families": {}, "perf_analyzer": {"b": 2}}


def test_samples_summarize_like_summarize() -> None:
    assert Samples([0.1, 0.2, 0.3], 0.6).level(1) == summarize(1, [0.1, 0.2, 0.3], 0.6)
