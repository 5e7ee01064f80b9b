"""The launcher's load-balancer agent (HAProxy's agent-check protocol) and its options, without Triton."""

from __future__ import annotations

import socket
import threading

import pytest

from triton_launcher.__main__ import _start_agent, parse_arguments
from triton_launcher.agent import DrainAgent, ReplicaState
from triton_launcher.errors import LauncherError


def ask(agent: DrainAgent) -> bytes:
    """What HAProxy reads: one line, then the agent closes the connection."""
    with socket.create_connection(agent.address, timeout=5) as connection:
        received = b""
        while chunk := connection.recv(64):
            received += chunk
    return received


def test_the_agent_tells_each_state_as_haproxys_words_one_line_per_connection() -> None:
    with DrainAgent("127.0.0.1", 0) as agent:
        assert ask(agent) == b"down#starting\n"
        agent.set(ReplicaState.SERVING)
        assert ask(agent) == b"ready up\n"
        agent.set(ReplicaState.RESTARTING)
        assert ask(agent) == b"down#restarting\n"
        agent.set(ReplicaState.SERVING)
        assert ask(agent) == b"ready up\n"
        agent.set(ReplicaState.DRAINING)
        assert ask(agent) == b"drain\n"


def test_a_replica_that_drains_never_goes_back_into_rotation() -> None:
    with DrainAgent("127.0.0.1", 0) as agent:
        agent.set(ReplicaState.SERVING)
        agent.set(ReplicaState.DRAINING)
        agent.set(ReplicaState.SERVING)  # a watchdog restart that ends during the drain
        assert agent.state is ReplicaState.DRAINING
        assert ask(agent) == b"drain\n"
        agent.set(ReplicaState.STOPPING)
        agent.set(ReplicaState.RESTARTING)
        assert ask(agent) == b"down#stopping\n"


def test_a_closed_agent_answers_nothing() -> None:
    agent = DrainAgent("127.0.0.1", 0)
    with agent:
        address = agent.address
    with pytest.raises(ConnectionRefusedError), socket.create_connection(address, timeout=5):
        pass


def test_an_agent_port_in_use_is_a_start_failure_that_names_the_port() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(LauncherError, match=rf"--agent-port {port}: cannot listen on 127.0.0.1 \(Address already"):
            _start_agent(parse_arguments(["--agent-port", str(port)]))


@pytest.mark.parametrize(("arguments", "message"), [
    (["--drain-seconds", "-1"], "--drain-seconds=-1.0 is invalid: must be 0 to 3600 seconds"),
    (["--drain-seconds", "4000"], "--drain-seconds=4000.0 is invalid: must be 0 to 3600 seconds"),
    (["--agent-port", "0"], "--agent-port=0 is invalid: must be a TCP port, 1 to 65535"),
    (["--agent-port", "70000"], "--agent-port=70000 is invalid: must be a TCP port, 1 to 65535"),
    (["--agent-port", "8001"], "--agent-port=8001 is invalid: it is the server's grpc port"),
    (["--http-port", "9000", "--agent-port", "9002"], "--agent-port=9002 is invalid: it is the server's metrics port"),
    (["--metrics-port", "9100", "--agent-port", "9100"], "--agent-port=9100 is invalid: it is the server's metrics"),
])
def test_drain_and_agent_options_are_checked(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse_arguments(arguments)
    assert message in capsys.readouterr().err


def test_the_agent_keeps_answering_after_accept_fails() -> None:
    """Out of file descriptors, say: only the agent can take back its own "down", so it must not die."""

    class FailsOnce:
        def __init__(self, listener: socket.socket) -> None:
            self.listener = listener
            self.failed = threading.Event()

        def accept(self) -> tuple[socket.socket, object]:
            if not self.failed.is_set():
                self.failed.set()
                raise OSError(24, "Too many open files")
            return self.listener.accept()

        def close(self) -> None:
            self.listener.close()

    with DrainAgent("127.0.0.1", 0) as agent:
        wrapped = FailsOnce(agent._listener)
        agent._listener = wrapped  # type: ignore[assignment]
        agent.set(ReplicaState.SERVING)
        assert wrapped.failed.wait(timeout=5)  # the agent's next accept raised
        assert ask(agent) == b"ready up\n"
