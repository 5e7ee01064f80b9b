"""The launcher's watchdog: prove by real inference that every model serves, and restart the server when not.

Triton 2.51 does not restart a Python stub that died (killed by the OOM killer, a segfault in a CUDA kernel,
an operator's ``kill``): the model's readiness endpoint keeps answering 200 while every request to it fails
with HTTP 500 "Stub process '<model>_0_0' is not healthy". So the watchdog does not trust readiness. Every
``interval_s`` it sends each model the same small request the start-up probe sends (64x64, one step) and
restarts the server when one fails for any reason but a full queue: that finds a hung model as well as a dead
one. It also looks every second for the crashes that need no probe: the server process gone, or a stub that
has died (a zombie child of the server: Triton does not reap it). So a crash is repaired within seconds, and
a model with two instances, one dead, is not left half-broken because the probe happened to reach the other.

A restart is the whole server, on the same ports with the same key (``TritonServer.restart``): model
load/unload over Triton's API stays disabled, so that no client can swap models. On a GPU that means every
model is loaded again, which takes as long as a start.

A stop requested of the server (``TritonServer.request_stop``) ends the watch in whatever phase it is: a probe
that fails because the server is stopping is no fault, a restart under way gives up, and the back-off between
restarts is cut short.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from inference_client import triton

from .agent import DrainAgent, ReplicaState
from .errors import ServerStartError, StopRequestedError
from .server import TritonServer

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 30.0
DEFAULT_PROBE_TIMEOUT_S = 300.0
"""A probe waits in the model's queue like any request: behind up to max_queue_size multi-second generations."""
MAX_FAILED_RESTARTS = 3
"""Consecutive restarts that fail to bring the models back before the watchdog gives up (and serve exits)."""
PROBE_TIMEOUTS_FOR_FAULT = 2
"""Probes in a row without any answer that make a fault: one can be a long queue, two is a hung model."""
RESTART_BACKOFF_S = 5.0
"""Wait before a further restart attempt, times the attempts so far."""
_CRASH_CHECK_S = 1.0
_clock = time.monotonic  # how long a probe took (tests replace it)


class WatchdogGaveUpError(ServerStartError):
    """The server could not be brought back after ``MAX_FAILED_RESTARTS`` attempts in a row."""


@dataclass(frozen=True)
class Fault:
    """Why the server needs a restart."""

    model: str | None
    """The model whose probe failed; None when the server process itself is gone."""
    reason: str


class Watchdog:
    """Watches one started, ready ``TritonServer`` and restarts it on a fault. Run it with :meth:`run`."""

    def __init__(self, server: TritonServer, interval_s: float = DEFAULT_INTERVAL_S,
                 probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
                 restart_backoff_s: float = RESTART_BACKOFF_S, agent: DrainAgent | None = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s={interval_s} is invalid: must be a positive number of seconds")
        self.server = server
        self.interval_s = interval_s
        self.probe_timeout_s = probe_timeout_s
        self.restart_backoff_s = restart_backoff_s
        self.agent = agent
        """Told while a restart is under way, so that a proxy sends the replica nothing meanwhile."""
        self.restarts = 0
        self.faults: list[Fault] = []
        self._timeouts: dict[str, int] = {}
        """Probes in a row that had no answer at all, per model."""
        self._restarted = threading.Condition()

    def run(self) -> None:
        """Watch until a stop of the server is requested; raise WatchdogGaveUpError if the server cannot be
        brought back.

        Call it from the thread that started the server and that outlives it: the server is started with a
        parent-death signal that fires when the starting thread ends, and restarts start it from here.
        """
        next_probe = time.monotonic() + self.interval_s
        while not self.server.wait_for_stop_request(_CRASH_CHECK_S):
            fault = self._crash()
            if fault is None and time.monotonic() >= next_probe:
                fault = self.check()
                next_probe = time.monotonic() + self.interval_s
            if fault is not None and not self.server.stop_requested:
                self._recover(fault)
                next_probe = time.monotonic() + self.interval_s

    def check(self) -> Fault | None:
        """Probe every model by real inference; the first fault found, or None if all serve."""
        process = self.server.process
        if process is None or process.poll() is not None:
            return self._crash()
        for model in self.server.models:
            reason = self._probe(model)
            if reason is not None:
                return Fault(model, reason)
        return None

    def wait_for_restarts(self, count: int, timeout_s: float) -> bool:
        """Block until the watchdog has completed ``count`` restarts in all (tests and tools); False on timeout."""
        with self._restarted:
            return self._restarted.wait_for(lambda: self.restarts >= count, timeout=timeout_s)

    def _probe(self, model: str) -> str | None:
        started = _clock()
        try:
            self.server.probe(model, timeout_s=self.probe_timeout_s)
        except StopRequestedError:
            return None  # the server is stopping: whatever the probe met, it is no fault
        except ServerStartError as error:
            reason = str(error).split("\n", 1)[0]  # without the log tail that start-up errors carry
            # Busy, not broken: Triton's queue answered for the model.
            if triton.QUEUE_FULL in reason or triton.QUEUE_TIMEOUT in reason:
                logger.info("watchdog: %s is busy (%s); its probe waits for the next round", model, reason)
                self._timeouts.pop(model, None)
                return None
            if _clock() - started >= self.probe_timeout_s:
                # A long queue of long generations can outlast one probe; a hung model outlasts two.
                self._timeouts[model] = self._timeouts.get(model, 0) + 1
                if self._timeouts[model] < PROBE_TIMEOUTS_FOR_FAULT:
                    logger.warning("watchdog: %s's probe had no answer in %.0f s; one more and it is a fault",
                                   model, self.probe_timeout_s)
                    return None
            self._timeouts.pop(model, None)
            return reason
        self._timeouts.pop(model, None)
        return None

    def _recover(self, fault: Fault) -> None:
        """Restart the server, with back-off, until it serves; return early when a stop is requested."""
        self.faults.append(fault)
        self._tell_agent(ReplicaState.RESTARTING)
        for attempt in range(1, MAX_FAILED_RESTARTS + 1):
            where = f"model {fault.model}" if fault.model else "the server"
            logger.error("watchdog: %s failed (%s); restarting tritonserver (attempt %d of %d)", where,
                         fault.reason, attempt, MAX_FAILED_RESTARTS)
            try:
                self.server.restart()
            except StopRequestedError:
                logger.info("watchdog: stop requested during the restart; not restarting")
                return
            except Exception as error:  # any failure to start (ENOMEM from fork too) is one failed attempt
                if self.server.stop_requested:
                    logger.info("watchdog: stop requested during the restart (%s)", str(error).split("\n", 1)[0])
                    return
                logger.error("watchdog: restart failed: %s", error)
                # Give what the last attempt held (GPU memory of killed stubs, ports) time to be released.
                backoff_s = self.restart_backoff_s * attempt
                logger.info("watchdog: next restart attempt in %.0f s", backoff_s)
                if self.server.wait_for_stop_request(backoff_s):
                    return
                continue
            with self._restarted:
                self.restarts += 1
                self._restarted.notify_all()
            self._tell_agent(ReplicaState.SERVING)
            logger.info("watchdog: tritonserver is serving again (restart %d)", self.restarts)
            return
        raise WatchdogGaveUpError(f"tritonserver could not be brought back after {MAX_FAILED_RESTARTS} restarts "
                                  f"in a row (first fault: {fault.reason})")

    def _tell_agent(self, state: ReplicaState) -> None:
        if self.agent is not None:
            self.agent.set(state)

    def _crash(self) -> Fault | None:
        """The fault that needs no probe to be seen: the server process gone, or one of its stubs dead."""
        process = self.server.process
        if process is None or process.poll() is not None:
            code = None if process is None else process.returncode
            return Fault(None, f"tritonserver exited (exit code {code})")
        dead = _dead_child(process.pid)
        if dead is not None:
            # With two instances the probe may well reach the live one, yet requests to the dead one fail.
            return Fault(None, f"a Python stub of tritonserver died (pid {dead}); Triton does not restart it")
        return None


def _dead_child(pid: int) -> int | None:
    """A child of ``pid`` that is a zombie (a stub that died; Triton does not reap it), or None (Linux /proc)."""
    # Each thread lists the children it forked: Triton starts stubs from its model-loading threads.
    children: list[str] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += (task / "children").read_text().split()
        except OSError:  # the thread ended, or no CONFIG_PROC_CHILDREN: the periodic probes still find faults
            continue
    for child in children:
        try:
            stat = Path(f"/proc/{child}/stat").read_text()
        except OSError:
            continue  # gone between the two reads: reaped, so not a zombie
        # The state follows the command name in parentheses, which may itself hold spaces and parentheses.
        if stat[stat.rindex(")") + 2:].startswith("Z"):
            return int(child)
    return None
