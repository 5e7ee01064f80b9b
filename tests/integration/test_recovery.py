"""Crash recovery through the real tritonserver: stubs and the server killed, the watchdog brings them back.

One server with only tiny-sd15 (two instances), so that a restart takes seconds, watched for the whole module
by a watchdog thread. Each test kills something with SIGKILL, as the OOM killer would.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from capability import CapabilityHandle, CapabilityLayer, TemporarilyUnavailableError
from triton_launcher.repository import TINY_CPU_INSTANCES, build_tiny_repository
from triton_launcher.server import TritonServer, loopback_options
from triton_launcher.watchdog import Watchdog

from .conftest import assert_same_image
from .test_capability import decoded

MODEL = "tiny-sd15"
RESTART_TIMEOUT_S = 240.0
"""Bound on any wait for the watchdog: a restart of this one-model server takes seconds, even on 2 busy cores."""


class Watched:
    """The module's server, its watchdog running in a thread, and capability handles on it."""

    def __init__(self, server: TritonServer, watchdog: Watchdog, layer: CapabilityLayer,
                 impatient_layer: CapabilityLayer) -> None:
        self.server = server
        self.watchdog = watchdog
        authority = layer.create_authority("sys").id
        handle = layer.mint("sys", authority, {"server_url": server.url, "default_model": MODEL}).give("alice")
        self.patient = handle
        """Retries seeded requests while the server restarts (the layer's default)."""
        self.impatient = impatient_layer.handle("alice", handle.id)
        """The same capability through a layer that never retries."""
        self.layer = layer

    def stubs(self) -> list[psutil.Process]:
        assert self.server.process is not None
        return [process for process in psutil.Process(self.server.process.pid).children(recursive=True)
                if f"/{MODEL}/1/model.py" in " ".join(process.cmdline())]

    def held_leases(self) -> int:
        return int(self.layer.store.read().execute("SELECT COUNT(*) FROM leases").fetchone()[0])

    def outcomes(self) -> list[str]:
        return [entry["outcome"] for entry in self.layer.capabilities.audit_log("alice", self.patient.id)
                if entry["action"] == "generate"]


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Watched]:
    scratch = tmp_path_factory.mktemp("recovery")
    repository = build_tiny_repository(scratch / "repository", families=("sd15",))
    options = loopback_options(repository, scratch / "state", ready_timeout_s=RESTART_TIMEOUT_S)
    with TritonServer(options) as server:
        # Probes every 2 s would catch a fault alone; the per-second crash check usually finds it first.
        watchdog = Watchdog(server, interval_s=2.0, probe_timeout_s=60.0)
        thread = threading.Thread(target=watchdog.run, name="watchdog")
        thread.start()
        try:
            with CapabilityLayer(options.state_dir, retry_unavailable_s=RESTART_TIMEOUT_S) as layer, \
                    CapabilityLayer(options.state_dir, retry_unavailable_s=0) as impatient_layer:
                yield Watched(server, watchdog, layer, impatient_layer)
        finally:
            server.request_stop()
            thread.join()


def generate(handle: CapabilityHandle, seed: int | None, side: int = 64, steps: int = 2) -> np.ndarray:
    options = {"width": side, "height": side, "numInferenceSteps": steps}
    if seed is not None:
        options["seed"] = seed
    return np.asarray(decoded(handle.text_to_image("a lighthouse at dusk", options)))


def test_killed_stubs_leave_the_model_ready_but_failing_until_the_watchdog_restarts_the_server(
    watched: Watched,
) -> None:
    reference = generate(watched.patient, seed=7)
    restarts = watched.watchdog.restarts
    stubs = watched.stubs()
    assert len(stubs) == TINY_CPU_INSTANCES
    for stub in stubs:
        stub.send_signal(signal.SIGKILL)

    # Right after the crash: Triton still calls the model ready (so readiness alone proves nothing), and a
    # request without a seed fails at once with an error that says to retry.
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
    with direct.open(f"{watched.server.url}/v2/models/{MODEL}/ready") as response:
        assert response.status == 200
    with pytest.raises(TemporarilyUnavailableError, match="temporarily unavailable"):
        generate(watched.impatient, seed=None)

    # A seeded request waits through the restart and gets the very image the same seed gave before.
    after = generate(watched.patient, seed=7)
    assert_same_image(after, reference)
    assert watched.watchdog.wait_for_restarts(restarts + 1, RESTART_TIMEOUT_S)
    assert {stub.pid for stub in watched.stubs()}.isdisjoint(stub.pid for stub in stubs)
    assert watched.held_leases() == 0
    assert watched.outcomes()[-3:] == ["ok", "failed", "ok"]


@pytest.mark.parametrize("victim", ["stub", "server"])
def test_a_crash_during_a_seeded_generation_costs_the_caller_a_retry_not_an_error(
    watched: Watched, caplog: pytest.LogCaptureFixture, victim: str,
) -> None:
    caplog.set_level(logging.INFO, logger="capability.generation")
    side, steps, seed = 384, 50, 11  # long enough (a second or more) to be killed in the middle
    reference = generate(watched.patient, seed=seed, side=side, steps=steps)
    restarts = watched.watchdog.restarts
    before = {stub.pid: sum(stub.cpu_times()[:2]) for stub in watched.stubs()}
    results: list[np.ndarray] = []
    caller = threading.Thread(target=lambda: results.append(generate(watched.patient, seed, side=side, steps=steps)))
    caller.start()
    # The generation is under way once one stub has burnt CPU well beyond what an idle one does.
    busy = _wait_for_busy_stub(watched, before)
    assert watched.server.process is not None
    (busy if victim == "stub" else psutil.Process(watched.server.process.pid)).send_signal(signal.SIGKILL)
    caller.join(RESTART_TIMEOUT_S)
    assert not caller.is_alive()
    assert len(results) == 1
    assert_same_image(results[0], reference)
    assert "retrying a seeded request" in caplog.text  # the kill did cut the generation short
    assert watched.watchdog.wait_for_restarts(restarts + 1, RESTART_TIMEOUT_S)
    assert watched.held_leases() == 0
    assert watched.outcomes()[-2:] == ["ok", "ok"]


def test_a_killed_server_comes_back_on_the_same_url_and_unseeded_callers_are_told_to_retry(
    watched: Watched,
) -> None:
    restarts = watched.watchdog.restarts
    assert watched.server.process is not None
    url, server_file = watched.server.url, Path(watched.server.options.state_dir) / "server.json"
    key_file = Path(watched.server.options.state_dir) / "infer-key"
    key = key_file.read_text()
    os.kill(watched.server.process.pid, signal.SIGKILL)
    with pytest.raises(TemporarilyUnavailableError, match="temporarily unavailable"):
        generate(watched.impatient, seed=None)
    assert watched.watchdog.wait_for_restarts(restarts + 1, RESTART_TIMEOUT_S)
    assert watched.server.url == url
    assert str(watched.server.process.pid) in server_file.read_text()
    assert key_file.read_text() == key  # clients holding the key need not read it again
    assert generate(watched.impatient, seed=None).shape == (64, 64, 3)
    assert watched.held_leases() == 0
    assert any(fault.reason.startswith("tritonserver exited") for fault in watched.watchdog.faults)


def _wait_for_busy_stub(watched: Watched, cpu_before: dict[int, float]) -> psutil.Process:
    """The stub that has started on the caller's generation (polled: the CPU time is the only sign of it)."""
    stubs = [stub for stub in watched.stubs() if stub.pid in cpu_before]
    for _ in range(int(RESTART_TIMEOUT_S / 0.05)):
        for stub in stubs:
            if sum(stub.cpu_times()[:2]) - cpu_before[stub.pid] > 0.3:
                return stub
        time.sleep(0.05)
    raise AssertionError("no stub started on the generation")


def test_a_request_that_crashes_tritonserver_itself_costs_a_restart_not_the_service(watched: Watched) -> None:
    # Triton 2.51 aborts (std::bad_alloc) on a JSON tensor that declares a huge shape. Only holders of the key
    # can send it (without the key it is refused before parsing: test_fuzz_tensors), but if one does, the
    # watchdog restarts the server like after any crash.
    restarts = watched.watchdog.restarts
    body = json.dumps({"inputs": [
        {"name": "PROMPT", "shape": [1, 1], "datatype": "BYTES", "data": ["a red cube"]},
        {"name": "WIDTH", "shape": [1 << 40, 1], "datatype": "INT32", "data": [64]},
    ]}).encode()
    request = urllib.request.Request(f"{watched.server.url}/v2/models/{MODEL}/infer", data=body, method="POST",
                                     headers={**watched.server.headers, "Content-Type": "application/json"})
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, OSError)):
        direct.open(request, timeout=60)
    assert watched.watchdog.wait_for_restarts(restarts + 1, RESTART_TIMEOUT_S)
    assert generate(watched.impatient, seed=None).shape == (64, 64, 3)
    assert any("exited" in fault.reason for fault in watched.watchdog.faults[-1:])
