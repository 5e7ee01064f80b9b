"""Stop means stop: scripts/serve's launcher sent SIGTERM in every phase of its life, against the real server.

Each test runs ``python -m triton_launcher`` as an operator (or Kubernetes) does, waits for the phase it wants by
what the launcher says on stderr or what the server reports, sends SIGTERM there, and checks what they would see:
the exit code, that it came within the bound the launcher promises (its exit timeout, the stubs' grace and a
margin; a launcher that does not exit in time fails ``wait``), that requests in flight were answered, and that no
process of any tritonserver it started is left.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from inference_client import contract, triton
from triton_launcher.repository import build_tiny_repository, with_cpu_instances
from triton_launcher.server import STUB_EXIT_GRACE_S, free_ports

MODEL = "tiny-sd15"
WAIT_S = 180.0
"""Bound on waiting for a phase to be reached (a start on a loaded CI machine)."""
MARGIN_S = 15.0
"""What a stop may take beyond the launcher's own bound: Python's start, the kill, the reaping."""
LONG_SIDE, LONG_STEPS = 512, 30
"""A generation of several seconds on these CPUs: long enough to still be in flight when the signal comes."""
MAX_TINY_STEPS = 100
"""The most steps the tiny models take."""


class Launcher:
    """``python -m triton_launcher`` on the one-model tiny repository, its stderr in a file to read lines from."""

    def __init__(self, repository: Path | None, scratch: Path, *arguments: str,
                 environment: dict[str, str] | None = None, exit_timeout_s: int = 30) -> None:
        """``repository``: None serves the tiny models (``--tiny``), built if the cache lacks them."""
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.exit_timeout_s = exit_timeout_s
        self.log_path = scratch / "launcher.log"
        source = ["--tiny"] if repository is None else ["--model-repository", str(repository)]
        command = [sys.executable, "-m", "triton_launcher", *source,
                   "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                   "--metrics-port", str(self.metrics_port), "--state-dir", str(scratch / "state"),
                   "--ready-timeout", str(int(WAIT_S)), "--exit-timeout", str(exit_timeout_s), *arguments]
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                         env={**os.environ, **(environment or {})})

    @property
    def bound_s(self) -> float:
        """How long an orderly stop may take: requests in flight, then the stubs, then a margin."""
        return self.exit_timeout_s + STUB_EXIT_GRACE_S + MARGIN_S

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, pattern: str, count: int = 1) -> None:
        """Until ``pattern`` has appeared ``count`` times on the launcher's stderr."""
        deadline = time.monotonic() + WAIT_S
        while len(re.findall(pattern, self.log())) < count:
            if self.process.poll() is not None:
                pytest.fail(f"the launcher exited ({self.process.returncode}) before {pattern!r}:\n{self.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"waited {WAIT_S:.0f} s for {pattern!r}:\n{self.log()}")
            time.sleep(0.05)

    def wait_until_ready(self) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        assert line == f"READY http://127.0.0.1:{self.http_port}", self.log()

    def server_pids(self) -> list[int]:
        """Every tritonserver this launcher started (each leads a process group of its own with its stubs)."""
        return [int(pid) for pid in re.findall(r"started \S+tritonserver \(pid (\d+)\)", self.log())]

    def stop(self, signal_number: int = signal.SIGTERM) -> None:
        self.process.send_signal(signal_number)

    def exit_code(self) -> int:
        """The launcher's exit code; fails the test if it is not out within :attr:`bound_s`."""
        try:
            return self.process.wait(timeout=self.bound_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher did not exit within {self.bound_s:.0f} s of the signal:\n{self.log()}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in self.server_pids():
            for survivor in survivors_of(pid):
                survivor.kill()
        self._log.close()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def infer_key(self, scratch: Path) -> str:
        return (scratch / "state" / "infer-key").read_text(encoding="utf-8").strip()

    def pending_requests(self) -> int:
        """Requests waiting in the model's queue, by Triton's own metric."""
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with direct.open(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        match = re.search(rf'^nv_inference_pending_request_count{{model="{MODEL}",version="1"}} (\d+)', text, re.M)
        return 0 if match is None else int(match[1])


def survivors_of(server_pid: int) -> list[psutil.Process]:
    """The live (not zombie) processes of the process group that ``server_pid`` leads."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == server_pid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


def wait_until_generating(launcher: Launcher, cpu_s: float = 0.5) -> None:
    """Until the model's stub has spent ``cpu_s`` more seconds of CPU than now: a generation is under way (a
    watchdog probe, 64x64 and one step, costs far less)."""
    stubs = [child for pid in launcher.server_pids() for child in psutil.Process(pid).children(recursive=True)
             if f"/{MODEL}/1/model.py" in " ".join(child.cmdline())]
    assert stubs, f"no stub of {MODEL} under the server:\n{launcher.log()}"

    def spent() -> float:
        return sum(sum(stub.cpu_times()[:2]) for stub in stubs)

    start = spent()
    deadline = time.monotonic() + WAIT_S
    while spent() - start < cpu_s:
        assert time.monotonic() < deadline, f"{MODEL} did not start generating:\n{launcher.log()}"
        time.sleep(0.05)


def wait_for_a_queued_request(launcher: Launcher) -> None:
    deadline = time.monotonic() + WAIT_S
    while launcher.pending_requests() < 1:
        assert time.monotonic() < deadline, f"no request waited in {MODEL}'s queue:\n{launcher.log()}"
        time.sleep(0.05)


def assert_nothing_left(launcher: Launcher) -> None:
    pids = launcher.server_pids()
    alive = {pid: survivors_of(pid) for pid in pids}
    assert all(not processes for processes in alive.values()), f"left running: {alive}\n{launcher.log()}"


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """The tiny SD1.5 model alone, with one instance: a generation holds it, so whatever comes next waits."""
    repository = build_tiny_repository(tmp_path / "repository", families=("sd15",), streaming=())
    config = repository / MODEL / "config.pbtxt"
    config.write_text(with_cpu_instances(config.read_text(), 1))
    return repository


@pytest.fixture
def launched(request: pytest.FixtureRequest, repository: Path, tmp_path: Path) -> Iterator[Launcher]:
    arguments, options = getattr(request, "param", ((), {}))
    launcher = Launcher(repository, tmp_path, *arguments, **options)
    try:
        yield launcher
    finally:
        launcher.close()


class Generations:
    """Long generations sent in threads of their own; what each caller got back (an image or an error)."""

    def __init__(self, launcher: Launcher, key: str, count: int, steps: int = LONG_STEPS) -> None:
        self.outcomes: list[object] = []
        self.steps = steps
        self.threads = [threading.Thread(target=self._generate, args=(launcher, key, seed)) for seed in range(count)]
        for index, thread in enumerate(self.threads):
            if index == 1:
                # Sent together, two requests can reach an idle model at the same instant and run as one batch, and
                # then none waits in the queue: the next ones go once the first is under way.
                wait_until_generating(launcher)
            thread.start()

    def _generate(self, launcher: Launcher, key: str, seed: int) -> None:
        request = contract.TextToImage("a lighthouse at dusk", width=LONG_SIDE, height=LONG_SIDE,
                                       num_inference_steps=self.steps, seed=seed)
        try:
            with triton.http_client(f"127.0.0.1:{launcher.http_port}", timeout_s=WAIT_S) as client:
                self.outcomes.append(triton.infer_http(client, MODEL, request, key))
        except Exception as error:  # what the caller saw, asserted by the test
            self.outcomes.append(error)

    def join(self) -> list[object]:
        for thread in self.threads:
            thread.join(WAIT_S)
        assert not any(thread.is_alive() for thread in self.threads)
        return self.outcomes


def test_a_stop_while_the_tiny_models_are_built_exits_at_once(launched_tiny: Launcher) -> None:
    launched_tiny.wait_for_log("building the tiny models")
    launched_tiny.stop()
    assert launched_tiny.exit_code() == 0
    assert launched_tiny.server_pids() == []  # no server was started
    assert "stopped before tritonserver was started" in launched_tiny.log()


@pytest.fixture
def launched_tiny(tmp_path: Path) -> Iterator[Launcher]:
    # An empty cache: the launcher builds the tiny models, which takes far longer than the signal takes to come.
    launcher = Launcher(None, tmp_path, environment={"TRITON_DIFFUSERS_CACHE": str(tmp_path / "cache")})
    try:
        yield launcher
    finally:
        launcher.close()


def test_a_stop_while_the_models_load_stops_the_server_and_never_says_ready(launched: Launcher) -> None:
    launched.wait_for_log(r"started \S+tritonserver \(pid \d+\)")
    launched.stop()
    assert launched.exit_code() == 0
    assert launched.process.stdout is not None
    assert launched.process.stdout.read() == ""  # no READY line
    assert "stop requested" in launched.log() or "stopped while starting" in launched.log()
    assert_nothing_left(launched)


@pytest.mark.parametrize("launched", [(("--watchdog-interval", "1"), {"exit_timeout_s": 120})], indirect=True)
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_during_a_watchdog_probe_lets_requests_in_flight_finish_and_exits_0(
    launched: Launcher, tmp_path: Path, signal_number: int,
) -> None:
    launched.wait_until_ready()
    # A long generation holds the model's one instance: of it and the watchdog's next probe, one runs while the
    # other waits in the queue, so once a request waits the probe is in flight.
    generations = Generations(launched, launched.infer_key(tmp_path), count=1)
    wait_for_a_queued_request(launched)
    launched.stop(signal_number)

    assert launched.exit_code() == 0
    [outcome] = generations.join()
    assert isinstance(outcome, contract.GeneratedImage), outcome  # the request in flight was answered
    assert outcome.image.shape == (LONG_SIDE, LONG_SIDE, 3)
    assert outcome.image.dtype == np.uint8
    assert f"{signal.Signals(signal_number).name} received: stopping" in launched.log()
    after_the_signal = launched.log().split(f"{signal.Signals(signal_number).name} received", 1)[1]
    assert "watchdog" not in after_the_signal  # the stop was no fault to it
    assert_nothing_left(launched)


@pytest.mark.parametrize("moment", ["stopping the crashed server", "loading the models again"])
def test_a_stop_during_a_watchdog_restart_ends_it_and_exits_0(launched: Launcher, moment: str) -> None:
    launched.wait_until_ready()
    os.kill(launched.server_pids()[0], signal.SIGKILL)
    launched.wait_for_log(r"restarting tritonserver \(attempt 1 of 3\)")
    if moment == "loading the models again":
        launched.wait_for_log(r"started \S+tritonserver \(pid \d+\)", count=2)
    launched.stop()

    assert launched.exit_code() == 0
    assert "attempt 2 of 3" not in launched.log()
    assert launched.process.stdout is not None
    assert launched.process.stdout.read() == ""  # the restart never said READY again
    assert_nothing_left(launched)


def test_a_stop_during_the_back_off_between_restarts_ends_it_and_exits_0(
    launched: Launcher, repository: Path, tmp_path: Path,
) -> None:
    launched.wait_until_ready()
    shutil.rmtree(repository)  # every restart now fails at once; the watchdog waits before the next attempt
    os.kill(launched.server_pids()[0], signal.SIGKILL)
    launched.wait_for_log("next restart attempt in")
    launched.stop()

    assert launched.exit_code() == 0
    assert "attempt 2 of 3" not in launched.log()
    assert_nothing_left(launched)


@pytest.mark.parametrize("launched", [((), {"exit_timeout_s": 120})], indirect=True)
def test_a_second_signal_kills_the_server_group_at_once_and_exits_1(launched: Launcher, tmp_path: Path) -> None:
    launched.wait_until_ready()
    generations = Generations(launched, launched.infer_key(tmp_path), count=2)
    wait_for_a_queued_request(launched)  # one generation runs, the other waits for it
    launched.stop()
    launched.wait_for_log("stopping tritonserver")
    launched.stop()

    try:
        code = launched.process.wait(timeout=MARGIN_S)  # well before the 120 s the requests in flight were given
    except subprocess.TimeoutExpired:
        pytest.fail(f"a second SIGTERM did not end the launcher within {MARGIN_S:.0f} s:\n{launched.log()}")
    assert code == 1
    assert "second SIGTERM: killing tritonserver's process group now" in launched.log()
    assert "did not stop in order: requests in flight were cut" in launched.log()
    assert_nothing_left(launched)
    outcomes = generations.join()
    assert not any(isinstance(outcome, contract.GeneratedImage) for outcome in outcomes), outcomes  # cut short


@pytest.mark.parametrize("launched", [((), {"exit_timeout_s": 1})], indirect=True)
def test_requests_that_outlast_the_exit_timeout_are_cut_and_the_launcher_exits_1(
    launched: Launcher, tmp_path: Path,
) -> None:
    launched.wait_until_ready()
    # The tiny models' most steps: many seconds, so that not even the first can end within the 1 s exit timeout
    # (with 30 it sometimes did, on an idle machine).
    generations = Generations(launched, launched.infer_key(tmp_path), count=2, steps=MAX_TINY_STEPS)
    wait_for_a_queued_request(launched)  # one generation runs (seconds), the other waits for it
    launched.stop()

    assert launched.exit_code() == 1
    # tritonserver says "Exit timeout expired. Exiting immediately." and exits 1 (or crashes on the way out).
    assert re.search(r"tritonserver ended with code -?\d+ on the stop, not in order", launched.log())
    assert "did not stop in order: requests in flight were cut" in launched.log()
    assert_nothing_left(launched)
    outcomes = generations.join()
    assert not any(isinstance(outcome, contract.GeneratedImage) for outcome in outcomes), outcomes


@pytest.mark.parametrize("launched", [((), {"exit_timeout_s": 1})], indirect=True)
def test_a_server_that_does_not_stop_in_time_is_killed_with_its_group_and_the_launcher_exits_1(
    launched: Launcher,
) -> None:
    launched.wait_until_ready()
    server = launched.server_pids()[0]
    os.kill(server, signal.SIGSTOP)  # a hung tritonserver: deaf to SIGTERM
    launched.stop()

    assert launched.exit_code() == 1
    assert f"tritonserver did not stop within {launched.exit_timeout_s + STUB_EXIT_GRACE_S:.0f} s" in launched.log()
    assert "did not stop in order: requests in flight were cut" in launched.log()
    assert_nothing_left(launched)


def ask_agent(port: int) -> str:
    """What HAProxy's agent check reads from the launcher's agent."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        return connection.makefile().readline().strip()


DRAIN_AGENT_PORT = free_ports(1)[0]


@pytest.mark.parametrize("launched", [(("--drain-seconds", "120", "--agent-port", str(DRAIN_AGENT_PORT)), {})],
                         indirect=True)
def test_a_stop_drains_serving_on_until_a_second_signal_then_stops_in_order(launched: Launcher,
                                                                            tmp_path: Path) -> None:
    launched.wait_until_ready()
    assert ask_agent(DRAIN_AGENT_PORT) == "ready up"
    launched.stop()
    launched.wait_for_log("SIGTERM received: draining for 120 s before the stop")
    assert ask_agent(DRAIN_AGENT_PORT) == "drain"
    # A request that still comes during the drain (from a proxy that has not asked the agent yet) is served.
    request = contract.TextToImage("a late request", width=64, height=64, num_inference_steps=1, seed=4)
    with triton.http_client(f"127.0.0.1:{launched.http_port}", timeout_s=WAIT_S) as client:
        image = triton.infer_http(client, MODEL, request, launched.infer_key(tmp_path))
    assert image.image.shape == (64, 64, 3)
    launched.stop()  # the second signal ends the drain, long before its 120 s, and the stop is orderly
    assert launched.exit_code() == 0
    assert "second SIGTERM: stopping now, without the rest of the drain" in launched.log()
    assert "killing" not in launched.log()
    assert_nothing_left(launched)
    with pytest.raises(ConnectionRefusedError):
        ask_agent(DRAIN_AGENT_PORT)


@pytest.mark.parametrize("launched", [(("--drain-seconds", "120", "--agent-port", str(DRAIN_AGENT_PORT)), {})],
                         indirect=True)
def test_a_stop_before_the_server_serves_does_not_drain(launched: Launcher) -> None:
    launched.wait_for_log(r"started \S+tritonserver \(pid \d+\)")
    assert ask_agent(DRAIN_AGENT_PORT) == "down#starting"
    launched.stop()
    assert launched.exit_code() == 0  # within an orderly stop's bound, not after a 120 s drain
    assert "draining" not in launched.log()
    assert_nothing_left(launched)
