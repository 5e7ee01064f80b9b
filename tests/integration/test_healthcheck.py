"""``python -m triton_launcher.healthcheck`` (the container's health check) against the real tritonserver: 0 while
every model answers a real inference, 1 as soon as one does not, even while Triton still calls it ready."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from inference_client.state import INFER_KEY_FILE, SERVER_FILE
from triton_launcher.repository import build_tiny_repository
from triton_launcher.server import TritonServer, loopback_options

PLAIN_MODEL, STREAMING_MODEL = "tiny-sd15", "tiny-sd15-stream"
CHECK_TIMEOUT_S = 120.0
"""The check's own bound: far more than a 64x64 one-step inference takes on each model, even on busy cores."""


def run_healthcheck(state_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "triton_launcher.healthcheck", "--state-dir", str(state_dir),
         "--timeout", str(CHECK_TIMEOUT_S)],
        check=False, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S + 60,
    )


def healthy_models(result: subprocess.CompletedProcess[str]) -> set[str]:
    return {line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok: ")}


def test_every_model_of_a_healthy_server_answers_the_check_streaming_ones_over_grpc(tiny_server: TritonServer) -> None:
    assert tiny_server.streaming_models, "the tiny repository has a streaming model: its gRPC path is checked too"
    result = run_healthcheck(tiny_server.options.state_dir)
    assert result.returncode == 0, result.stderr
    assert healthy_models(result) == set(tiny_server.models)


def test_a_wrong_inference_key_fails_the_check_on_every_model(tiny_server: TritonServer, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    shutil.copy(tiny_server.options.state_dir / SERVER_FILE, state_dir / SERVER_FILE)
    (state_dir / INFER_KEY_FILE).write_text("not-the-key\n")
    result = run_healthcheck(state_dir)
    assert result.returncode == 1
    assert healthy_models(result) == set()
    failed = {line.split()[1].rstrip(":") for line in result.stderr.splitlines() if line.startswith("unhealthy: tiny-")}
    assert failed == set(tiny_server.models)


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A server of its own, as its stubs get killed: one plain and one streaming model, no watchdog."""
    scratch = tmp_path_factory.mktemp("healthcheck")
    repository = build_tiny_repository(scratch / "repository", families=("sd15",), streaming=("sd15",))
    with TritonServer(loopback_options(repository, scratch / "state", ready_timeout_s=300)) as server:
        assert set(server.models) == {PLAIN_MODEL, STREAMING_MODEL}
        yield server


def kill_stubs(server: TritonServer, model: str) -> None:
    """SIGKILL every Python stub of ``model``, as the OOM killer would, and return once each has died."""
    assert server.process is not None
    stubs = [process for process in psutil.Process(server.process.pid).children(recursive=True)
             if f"/{model}/1/model.py" in command_line(process)]
    assert stubs, f"no stub of {model}"
    with contextlib.ExitStack() as stack:
        # A pidfd becomes readable when its process exits, reaped or not (tritonserver leaves dead stubs unreaped).
        exits = [os.pidfd_open(stub.pid) for stub in stubs]
        for descriptor in exits:
            stack.callback(os.close, descriptor)
        for stub in stubs:
            stub.send_signal(signal.SIGKILL)
        for descriptor in exits:
            readable, _, _ = select.select([descriptor], [], [], 30)
            assert readable, "a stub survived SIGKILL for 30 s"


def command_line(process: psutil.Process) -> str:
    """``process``'s command line; empty for a stub killed before (a zombie: tritonserver does not reap it)."""
    try:
        return " ".join(process.cmdline())
    except (psutil.ZombieProcess, psutil.NoSuchProcess):
        return ""


def model_ready(server: TritonServer, model: str) -> bool:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
    with direct.open(f"{server.url}/v2/models/{model}/ready") as response:
        return bool(response.status == 200)


def test_a_dead_stub_fails_the_check_while_triton_still_calls_its_model_ready(own_server: TritonServer) -> None:
    state_dir = own_server.options.state_dir
    assert run_healthcheck(state_dir).returncode == 0

    kill_stubs(own_server, STREAMING_MODEL)
    assert model_ready(own_server, STREAMING_MODEL)  # so readiness alone would call this server healthy
    result = run_healthcheck(state_dir)
    assert result.returncode == 1
    assert healthy_models(result) == {PLAIN_MODEL}
    assert f"unhealthy: {STREAMING_MODEL}: inference failed" in result.stderr

    kill_stubs(own_server, PLAIN_MODEL)
    assert model_ready(own_server, PLAIN_MODEL)
    result = run_healthcheck(state_dir)
    assert result.returncode == 1
    assert healthy_models(result) == set()
    assert f"unhealthy: {PLAIN_MODEL}: inference failed" in result.stderr
