"""The replica's word to a load balancer: HAProxy's agent-check protocol on a TCP port of its own.

A proxy in front of several replicas learns from its health checks only that a replica is gone, after it has
failed a few of them. The launcher knows earlier: when it is told to stop, and while the watchdog restarts the
server. HAProxy's agent check asks a port of the server's host and reads one line (configuration manual,
"agent-check"): ``ready up`` puts the replica (back) in rotation, ``drain`` takes it out of rotation for new
requests while those it has go on, ``down#...`` marks it down at once. The health check by real inference stays
the judge of whether the replica works: an agent that does not answer is not an error to HAProxy.

So a stop drains before it stops: the agent says ``drain``, the proxy sends no new request within one agent
interval, and after ``--drain-seconds`` tritonserver is stopped with its exit timeout for what is still running.
On Kubernetes the same happens through the endpoints (the pod leaves them when it starts terminating); the agent
makes it work for any HAProxy in front of any replicas.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from enum import Enum

logger = logging.getLogger(__name__)

_ACCEPT_POLL_S = 0.2
_SEND_TIMEOUT_S = 2.0


class ReplicaState(Enum):
    """What the agent tells the proxy, as HAProxy's agent words."""

    STARTING = "down#starting"
    SERVING = "ready up"
    RESTARTING = "down#restarting"
    DRAINING = "drain"
    STOPPING = "down#stopping"


_LEAVING = frozenset({ReplicaState.DRAINING, ReplicaState.STOPPING})


class DrainAgent:
    """Answers every connection on ``host:port`` with the replica's state (one line), then closes it."""

    def __init__(self, host: str, port: int) -> None:
        self._state = ReplicaState.STARTING
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._listener.settimeout(_ACCEPT_POLL_S)
        self.address = self._listener.getsockname()[:2]
        self._thread = threading.Thread(target=self._serve, name="drain-agent", daemon=True)

    def __enter__(self) -> DrainAgent:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def state(self) -> ReplicaState:
        with self._lock:
            return self._state

    def set(self, state: ReplicaState) -> None:
        """Tell the proxy ``state`` from now on. A replica that drains or stops never goes back into rotation
        (a watchdog restart that ends during a drain does not make it ``ready``)."""
        with self._lock:
            if self._state in _LEAVING and state not in _LEAVING:
                return
            changed, self._state = self._state != state, state
        if changed:
            logger.info("load-balancer agent: %s", state.value)

    def close(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._listener.close()

    def _serve(self) -> None:
        # Never ends before close(): only this agent can take back a "down" it said (HAProxy's rule), so an agent
        # that died after "down#restarting" would keep the replica out of rotation for the rest of its life.
        while not self._stopped.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as error:
                if self._stopped.is_set():
                    return
                logger.warning("load-balancer agent: accept failed (%s); still answering", error)
                self._stopped.wait(_ACCEPT_POLL_S)  # e.g. out of file descriptors: try again shortly
                continue
            # One short line to a peer that only reads: answered inline, one connection at a time.
            with connection, contextlib.suppress(OSError):
                connection.settimeout(_SEND_TIMEOUT_S)
                connection.sendall(f"{self.state.value}\n".encode("ascii"))
