"""The load-test arithmetic of scripts/bench --suite (no server)."""

from __future__ import annotations

import threading

import pytest

from triton_launcher.loadtest import ratios, run_concurrently, summarize


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

    level = run_concurrently(3, list(range(30)), call, Client)
    assert sorted(item for _, item in seen) == list(range(30))
    assert level.requests == 30
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
