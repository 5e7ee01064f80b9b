"""The watchdog's decisions against a stand-in server: which failures are faults, restarts, giving up."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from triton_launcher import watchdog as watchdog_module
from triton_launcher.__main__ import parse_arguments
from triton_launcher.errors import ServerStartError, StopRequestedError
from triton_launcher.watchdog import Fault, Watchdog, WatchdogGaveUpError


class StandInServer:
    """What the watchdog uses of TritonServer: the process, the models, probe and restart."""

    def __init__(self, probe_errors: dict[str, str], failing_restarts: int = 0) -> None:
        self.process: Any = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                             stdin=subprocess.PIPE)
        self.models = ["tiny-sd15", "tiny-flux"]
        self.probe_errors = probe_errors
        self.failing_restarts = failing_restarts
        self.restart_calls = 0
        self._stop = threading.Event()
        self.restarting = threading.Event()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def wait_for_stop_request(self, timeout_s: float) -> bool:
        return self._stop.wait(timeout_s)

    def request_stop(self) -> None:
        self._stop.set()

    def probe(self, model: str, timeout_s: float) -> None:
        if model in self.probe_errors:
            raise ServerStartError(f"probe inference on {model!r} failed: {self.probe_errors[model]}\n--- log ---")

    def restart(self) -> None:
        self.restart_calls += 1
        self.restarting.set()
        if self.restart_calls <= self.failing_restarts:
            raise ServerStartError("tritonserver exited during start-up (exit code 1)")
        self.close()
        self.probe_errors.clear()
        self.process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                        stdin=subprocess.PIPE)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


@pytest.fixture
def server_factory() -> Any:
    servers: list[StandInServer] = []

    def make(probe_errors: dict[str, str] | None = None, failing_restarts: int = 0) -> StandInServer:
        servers.append(StandInServer(dict(probe_errors or {}), failing_restarts))
        return servers[-1]

    yield make
    for server in servers:
        if server.process.poll() is None:
            server.close()


def test_every_model_serving_is_no_fault_and_a_full_queue_is_not_one_either(server_factory: Any) -> None:
    assert Watchdog(server_factory()).check() is None
    busy = server_factory({"tiny-flux": "[503] Exceeds maximum queue size"})
    assert Watchdog(busy).check() is None


def test_a_failed_probe_is_a_fault_of_that_model_without_the_log_tail(server_factory: Any) -> None:
    server = server_factory({"tiny-flux": "[500] Stub process 'tiny-flux_0_0' is not healthy."})
    assert Watchdog(server).check() == Fault(
        "tiny-flux", "probe inference on 'tiny-flux' failed: [500] Stub process 'tiny-flux_0_0' is not healthy.")


def test_a_server_process_that_exited_is_a_fault_and_is_restarted_until_it_serves(server_factory: Any) -> None:
    server = server_factory(failing_restarts=2)
    server.close()
    watchdog = Watchdog(server, interval_s=60, restart_backoff_s=0)
    assert watchdog.check() == Fault(None, "tritonserver exited (exit code 0)")
    runner = threading.Thread(target=watchdog.run)
    runner.start()
    try:
        assert watchdog.wait_for_restarts(1, timeout_s=60)
    finally:
        server.request_stop()
        runner.join()
    assert server.restart_calls == 3  # two failed attempts, then one that serves
    assert watchdog.restarts == 1
    assert watchdog.faults == [Fault(None, "tritonserver exited (exit code 0)")]


def test_the_watchdog_gives_up_after_restarts_that_keep_failing(server_factory: Any) -> None:
    server = server_factory({"tiny-sd15": "[500] Stub process 'tiny-sd15_0_0' is not healthy."},
                            failing_restarts=watchdog_module.MAX_FAILED_RESTARTS)
    watchdog = Watchdog(server, restart_backoff_s=0)
    fault = watchdog.check()
    assert fault is not None
    with pytest.raises(WatchdogGaveUpError, match="could not be brought back after 3 restarts"):
        watchdog._recover(fault)
    assert server.restart_calls == watchdog_module.MAX_FAILED_RESTARTS


def test_a_probe_cut_short_by_a_stop_is_no_fault(server_factory: Any) -> None:
    server = server_factory()
    server.probe = lambda model, timeout_s: (_ for _ in ()).throw(StopRequestedError("stop requested"))
    server.request_stop()
    assert Watchdog(server).check() is None


def test_a_restart_that_fails_because_of_a_stop_is_not_tried_again(server_factory: Any) -> None:
    server = server_factory(failing_restarts=watchdog_module.MAX_FAILED_RESTARTS)
    server.request_stop()  # the failure comes from the stop: tritonserver was sent SIGTERM while it started
    Watchdog(server, restart_backoff_s=0)._recover(Fault(None, "tritonserver exited (exit code 0)"))
    assert server.restart_calls == 1


def test_a_stop_ends_the_back_off_between_restarts(server_factory: Any) -> None:
    server = server_factory(failing_restarts=watchdog_module.MAX_FAILED_RESTARTS)
    watchdog = Watchdog(server, restart_backoff_s=3600)  # the back-off would last an hour
    runner = threading.Thread(target=watchdog._recover, args=(Fault(None, "tritonserver exited (exit code 0)"),))
    runner.start()
    assert server.restarting.wait(60)
    server.request_stop()
    runner.join(60)
    assert not runner.is_alive()
    assert server.restart_calls == 1
    assert watchdog.restarts == 0


def test_a_dead_child_is_found_among_the_children_of_any_thread() -> None:
    # A child process whose own child has exited but is not reaped yet (a zombie, as a dead stub is to Triton);
    # it reports what _dead_child finds then, and after reaping.
    script = f"""
import os, subprocess, sys, threading
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from triton_launcher.watchdog import _dead_child
children = []
waiting = [sys.executable, "-c", "import sys; sys.stdin.read()"]  # alive until its stdin closes
thread = threading.Thread(target=lambda: children.append(subprocess.Popen(waiting, stdin=subprocess.PIPE)))
thread.start(); thread.join()
before = _dead_child(os.getpid())
children[0].stdin.close()
os.waitid(os.P_PID, children[0].pid, os.WEXITED | os.WNOWAIT)
print(before, _dead_child(os.getpid()) == children[0].pid, end=" ")
children[0].wait()
print(_dead_child(os.getpid()))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.split() == ["None", "True", "None"]
    assert watchdog_module._dead_child(os.getpid() + 10_000_000) is None  # no such process: no answer, no error


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--watchdog-interval", "-1"], "--watchdog-interval=-1.0 is invalid: must be 0 (off) or a positive"),
        (["--probe-timeout", "0"], "--probe-timeout=0.0 is invalid: must be a positive number of seconds"),
        (["--exit-timeout", "-1"], "--exit-timeout=-1 is invalid: must be 0 to 3600 seconds"),
    ],
)
def test_serve_refuses_watchdog_settings_that_cannot_work(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse_arguments(arguments)
    assert message in capsys.readouterr().err


def test_a_queue_timeout_is_busy_and_a_probe_without_answer_is_a_fault_only_the_second_time(
    server_factory: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    busy = server_factory({"tiny-flux": "[503] Request timeout expired"})
    assert Watchdog(busy).check() is None
    hung = server_factory({"tiny-flux": "timed out"})
    watchdog = Watchdog(hung, probe_timeout_s=30)
    clock = iter([0.0, 30.0, 100.0, 130.0, 200.0, 201.0])  # two probes that used all their time, then a quick one
    monkeypatch.setattr(watchdog_module, "_clock", lambda: next(clock))
    assert watchdog._probe("tiny-flux") is None
    assert watchdog._probe("tiny-flux") == "probe inference on 'tiny-flux' failed: timed out"
    # A probe that fails quickly is a fault at once.
    assert watchdog._probe("tiny-flux") == "probe inference on 'tiny-flux' failed: timed out"


def test_the_agent_says_down_while_a_restart_is_under_way_and_ready_once_it_serves(server_factory: Any) -> None:
    """A proxy that asks the launcher's agent sends nothing to a replica being restarted, and takes it back."""
    from triton_launcher.agent import DrainAgent, ReplicaState

    server = server_factory({"tiny-sd15": "[500] Stub process 'tiny-sd15_0_0' is not healthy."}, failing_restarts=1)
    seen_during_restarts: list[ReplicaState] = []
    restart = server.restart

    def restart_and_note() -> None:
        seen_during_restarts.append(agent.state)
        restart()

    server.restart = restart_and_note
    with DrainAgent("127.0.0.1", 0) as agent:
        agent.set(ReplicaState.SERVING)
        watchdog = Watchdog(server, restart_backoff_s=0, agent=agent)
        fault = watchdog.check()
        assert fault is not None
        watchdog._recover(fault)
        assert seen_during_restarts == [ReplicaState.RESTARTING, ReplicaState.RESTARTING]  # a failed try, then one
        assert agent.state.value == "ready up"
        # A stop that began meanwhile wins: the agent never says ready again once it drains.
        agent.set(ReplicaState.DRAINING)
        watchdog._recover(Fault(None, "tritonserver exited (exit code 0)"))
        assert agent.state is ReplicaState.DRAINING
