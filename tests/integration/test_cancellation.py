"""A caller that goes away does not keep the model busy: a cancelled gRPC call stops at the next step.

Over HTTP Triton cannot see a caller leave (docs/contract.md, "Cancellation"); over gRPC it marks the
request cancelled, and the model asks after every denoising step.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

from inference_client import contract, triton
from inference_client.state import grpc_key_headers
from triton_launcher.server import TritonServer

from .conftest import Generator

MODEL = "tiny-sd15"
STEPS = 100
"""Hundreds of milliseconds per step at 512x512 on these CPUs: a call that ran to the end would take seconds."""
WAIT_S = 120.0
Found = TypeVar("Found")


def test_a_cancelled_grpc_generation_stops_after_the_step_it_was_at_and_the_model_serves_on(
    tiny_server: TritonServer, generator: Generator,
) -> None:
    log = Path(str(tiny_server.log_path))
    log_size = log.stat().st_size
    cpu_before = _stub_cpu_seconds(tiny_server)
    request = contract.TextToImage("a red cube", width=512, height=512, num_inference_steps=STEPS)
    answers: list[object] = []
    with triton.grpc_client(f"127.0.0.1:{tiny_server.options.grpc_port}") as client:
        call = client.async_infer(MODEL, triton.grpc_inputs(request), lambda result, error: answers.append(error),
                                  headers=grpc_key_headers(tiny_server.infer_key), client_timeout=WAIT_S)
        _wait_until(lambda: max(_spent(tiny_server, cpu_before)) > 0.5, "a stub to start on the generation")
        call.cancel()

    # Of the scheduler's steps: SD1.5's PNDM makes one more denoiser pass than it was asked for.
    stopped = _wait_until(lambda: re.search(r"cancelled by the caller after step (\d+) of (\d+)",
                                            log.read_bytes()[log_size:].decode(errors="replace")),
                          "the model to log that it stopped")
    assert stopped is not None
    assert int(stopped.group(2)) in (STEPS, STEPS + 1)
    assert int(stopped.group(1)) < STEPS
    assert "CANCELLED" in str(_wait_until(lambda: answers, "the cancelled call to be answered")[0])
    assert generator.generate(MODEL, seed=5).image.shape == (96, 128, 3)


def _stub_cpu_seconds(server: TritonServer) -> dict[int, float]:
    assert server.process is not None
    return {stub.pid: sum(stub.cpu_times()[:2])
            for stub in psutil.Process(server.process.pid).children(recursive=True)
            if f"/{MODEL}/1/model.py" in " ".join(stub.cmdline())}


def _spent(server: TritonServer, before: dict[int, float]) -> list[float]:
    return [seconds - before.get(pid, seconds) for pid, seconds in _stub_cpu_seconds(server).items()]


def _wait_until(condition: Callable[[], Found], what: str) -> Found:
    deadline = time.monotonic() + WAIT_S
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"waited {WAIT_S:.0f} s for {what}")
        time.sleep(0.05)
    return result
