"""``scripts/serve``: run tritonserver on a model repository until SIGINT or SIGTERM.

Prints exactly one line on stdout, ``READY http://127.0.0.1:PORT``, once every model has answered a real
inference; everything else goes to stderr and the server log. Then the watchdog (watchdog.py) probes the
models and restarts tritonserver on a crash, on the same port with the same key.

Stopping: the first SIGINT or SIGTERM, at any moment (building the tiny models, starting, waiting for the models,
a probe in flight, a restart, the back-off between restarts), starts an orderly stop: tritonserver refuses new
requests, finishes those in flight for up to ``--exit-timeout`` seconds, and its Python stubs exit; then the
launcher exits 0. A second signal, or a stop that outlasts the timeout, kills tritonserver's whole process group
and the launcher exits 1. Either way nothing of the server is left running. With ``--drain-seconds``, a stop of a
serving server first drains (it serves on while the load-balancer agent says "drain"); a second signal then ends
the drain and starts the orderly stop, and a third kills.

The main thread only waits for signals (:mod:`.signals`); a supervisor thread starts, watches and stops the server.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

from inference_client.state import STATE_DIR, InferKeyFileError, read_infer_key_file

from .agent import DrainAgent, ReplicaState
from .errors import LauncherError, StopRequestedError
from .paths import MODEL_REPOSITORY, TINY_REPOSITORY
from .server import (
    DEFAULT_EXIT_TIMEOUT_S,
    DEFAULT_HTTP_PORT,
    GROUP_EXIT_WAIT_S,
    LOOPBACK,
    MAX_EXIT_TIMEOUT_S,
    STUB_EXIT_GRACE_S,
    ServerOptions,
    TritonServer,
    become_subreaper,
)
from .signals import WOKEN, StopSignals
from .watchdog import DEFAULT_INTERVAL_S, DEFAULT_PROBE_TIMEOUT_S, Watchdog

logger = logging.getLogger("triton_launcher")


ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - only for a container, whose published ports decide who reaches it
LISTEN_ADDRESSES = (LOOPBACK, ALL_INTERFACES)
"""Both include loopback, where the launcher's probes and the watchdog connect; nothing else is offered."""
SUPERVISOR_MARGIN_S = 5.0
"""How much longer than the orderly stop itself (exit timeout, the stubs' grace, the wait for the group to be
gone) the main thread waits before it kills the server's group on its own: the supervisor kills it first unless
something holds the supervisor up."""
EXIT_CLEAN, EXIT_FAILED = 0, 1


def listen_arguments(address: str) -> tuple[str, ...]:
    """tritonserver flags that move every endpoint from loopback to ``address`` (none for loopback).

    Docker forwards a published port to the container's own interface, never to its loopback, so a server in a
    container must listen there too. The flags repeat ones the launcher already sets; tritonserver takes the
    last occurrence of a flag, so the rest of the command line stays exactly that of ``scripts/serve``.
    """
    if address == LOOPBACK:
        return ()
    return (f"--http-address={address}", f"--grpc-address={address}", f"--metrics-address={address}")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--tiny", action="store_true",
                        help="serve the tiny models (trained on shapes; built once, cached) on the CPU")
    source.add_argument("--model-repository", type=Path, default=None,
                        help=f"model repository to serve (default: {MODEL_REPOSITORY})")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT,
                        help="HTTP port on 127.0.0.1 (default: %(default)s); gRPC and metrics use the next two")
    parser.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default: HTTP port + 1)")
    parser.add_argument("--metrics-port", type=int, default=None, help="metrics port (default: HTTP port + 2)")
    parser.add_argument("--state-dir", type=Path, default=STATE_DIR,
                        help="where the inference key (mode 0600), server.json and the log go (default: %(default)s)")
    parser.add_argument("--ready-timeout", type=float, default=900.0, metavar="SECONDS",
                        help="give up if the models are not serving after this long (default: %(default)s)")
    parser.add_argument("--tritonserver", type=Path, default=None, metavar="PATH",
                        help="tritonserver binary (default: the bundled one, else the one on PATH)")
    parser.add_argument("--log-file", type=Path, default=None,
                        help="server log (default: STATE_DIR/tritonserver.log; '-' for stderr)")
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    parser.add_argument("--watchdog-interval", type=float, default=DEFAULT_INTERVAL_S, metavar="SECONDS",
                        help="probe every model by a real inference this often and restart tritonserver when one "
                             "fails; a dead stub or server is looked for every second (default: %(default)s; "
                             "0: no watchdog, serve exits when tritonserver does)")
    parser.add_argument("--exit-timeout", type=int, default=DEFAULT_EXIT_TIMEOUT_S, metavar="SECONDS",
                        help="on SIGINT or SIGTERM, requests in flight get this long to finish (tritonserver's "
                             "--exit-timeout-secs); then, or on a second signal, the server's whole process group "
                             "is killed (default: %(default)s)")
    parser.add_argument("--probe-timeout", type=float, default=DEFAULT_PROBE_TIMEOUT_S, metavar="SECONDS",
                        help="a watchdog probe that has no answer after this long counts as a fault; it waits in "
                             "the model's queue like any request (default: %(default)s)")
    parser.add_argument("--listen-address", choices=LISTEN_ADDRESSES, default=LOOPBACK,
                        help="address the HTTP, gRPC and metrics endpoints listen on (default: %(default)s); "
                             "0.0.0.0 only inside a container whose ports are published on the host's loopback "
                             "(docker/compose.yaml): the launcher itself always connects through 127.0.0.1")
    parser.add_argument("--infer-key-file", type=Path, default=None, metavar="PATH",
                        help="use the inference key in PATH (e.g. a mounted Kubernetes Secret, shared by every "
                             "replica and capability host) instead of a new random one at each start; restarts "
                             "keep it, a new key takes a new start (docs/serving.md)")
    parser.add_argument("--agent-port", type=int, default=None, metavar="N",
                        help="answer HAProxy's agent check on this port (same address as the server): ready, "
                             "drain while a stop drains, down while starting, restarting or stopping "
                             "(docs/kubernetes.md); default: no agent")
    parser.add_argument("--drain-seconds", type=float, default=0.0, metavar="SECONDS",
                        help="on a stop, keep serving this long first while the agent says drain, so that a "
                             "proxy routes new requests elsewhere before tritonserver stops (default: 0)")
    parser.add_argument("--dry-run", action="store_true", help="print the tritonserver command and exit")
    arguments = parser.parse_args(argv)
    for name in ("http_port", "grpc_port", "metrics_port"):
        port = getattr(arguments, name)
        if port is not None and not 1 <= port <= 65535:
            parser.error(f"--{name.replace('_', '-')}={port} is invalid: must be a TCP port, 1 to 65535")
    if arguments.watchdog_interval < 0:
        parser.error(f"--watchdog-interval={arguments.watchdog_interval} is invalid: must be 0 (off) or a "
                     "positive number of seconds")
    if arguments.probe_timeout <= 0:
        parser.error(f"--probe-timeout={arguments.probe_timeout} is invalid: must be a positive number of seconds")
    if not 0 <= arguments.exit_timeout <= MAX_EXIT_TIMEOUT_S:
        parser.error(f"--exit-timeout={arguments.exit_timeout} is invalid: must be 0 to {MAX_EXIT_TIMEOUT_S} seconds")
    if not 0 <= arguments.drain_seconds <= MAX_EXIT_TIMEOUT_S:
        parser.error(f"--drain-seconds={arguments.drain_seconds} is invalid: must be 0 to {MAX_EXIT_TIMEOUT_S} seconds")
    if arguments.agent_port is not None and not 1 <= arguments.agent_port <= 65535:
        parser.error(f"--agent-port={arguments.agent_port} is invalid: must be a TCP port, 1 to 65535")
    http_port = arguments.http_port
    server_port_of = {"http": http_port,
                      "grpc": arguments.grpc_port if arguments.grpc_port is not None else http_port + 1,
                      "metrics": arguments.metrics_port if arguments.metrics_port is not None else http_port + 2}
    taken = [name for name, port in server_port_of.items() if port == arguments.agent_port]
    if taken:
        parser.error(f"--agent-port={arguments.agent_port} is invalid: it is the server's {taken[0]} port; the agent "
                     f"needs a port of its own (the Helm chart uses the HTTP port + 3)")
    if arguments.ready_timeout <= 0:
        parser.error(f"--ready-timeout={arguments.ready_timeout} is invalid: must be a positive number of seconds")
    if arguments.model_repository is not None and not arguments.model_repository.is_dir():
        parser.error(f"--model-repository={arguments.model_repository} is invalid: not a directory")
    return arguments


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    arguments = parse_arguments(argv)
    if arguments.infer_key_file is not None:
        # Checked before anything slow (building the tiny models, loading weights); read again at every start.
        try:
            read_infer_key_file(arguments.infer_key_file)
        except InferKeyFileError as error:
            print(f"scripts/serve: {error} (--infer-key-file)", file=sys.stderr)
            return EXIT_FAILED
    repository = arguments.model_repository or (TINY_REPOSITORY if arguments.tiny else MODEL_REPOSITORY)
    options = ServerOptions(
        model_repository=repository.resolve(),
        state_dir=arguments.state_dir.resolve(),
        http_port=arguments.http_port,
        grpc_port=arguments.grpc_port,
        metrics_port=arguments.metrics_port,
        ready_timeout_s=arguments.ready_timeout,
        exit_timeout_s=arguments.exit_timeout,
        executable=arguments.tritonserver,
        log_file=arguments.log_file,
        log_verbose=arguments.log_verbose,
        infer_key_file=arguments.infer_key_file.resolve() if arguments.infer_key_file else None,
        extra_args=listen_arguments(arguments.listen_address),
    )
    server = TritonServer(options)
    if arguments.dry_run:
        try:
            print(shlex.join(server.command()))
        except LauncherError as error:
            print(f"scripts/serve: {error}", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_CLEAN

    become_subreaper()  # the stubs of a server that died are reaped here, with or without an init
    try:
        agent = _start_agent(arguments)
    except LauncherError as error:
        print(f"scripts/serve: {error}", file=sys.stderr)
        return EXIT_FAILED
    with StopSignals() as signals, agent or contextlib.nullcontext():
        return _serve_until_stopped(server, arguments, signals, agent)


def _serve_until_stopped(server: TritonServer, arguments: argparse.Namespace, signals: StopSignals,
                         agent: DrainAgent | None) -> int:
    """Serve from a supervisor thread while this (main) thread waits for signals; on the first one drain (if
    asked to), then stop in order; on a second, or past the deadline, kill. The exit code."""
    options = server.options
    supervisor = Supervisor(server, arguments, signals, agent)
    supervisor.start()
    received = signals.wait()
    if received == WOKEN:  # the server ended without being asked to (a start failure, the watchdog gave up)
        return supervisor.exit_code
    assert received is not None
    name = signal.Signals(received).name
    if arguments.drain_seconds > 0 and supervisor.serving:
        told = "the load-balancer agent says drain" if agent is not None else "no agent to tell a proxy"
        logger.info("%s received: draining for %.0f s before the stop (%s; requests that still come are served); "
                    "send it again to stop now", name, arguments.drain_seconds, told)
        if agent is not None:
            agent.set(ReplicaState.DRAINING)
        received = signals.wait(timeout_s=arguments.drain_seconds)
        if received == WOKEN:
            return supervisor.exit_code
        if received is not None:
            name = signal.Signals(received).name
            logger.warning("second %s: stopping now, without the rest of the drain", name)
    if agent is not None:
        agent.set(ReplicaState.STOPPING)
    logger.info("%s received: stopping; requests in flight get up to %d s (send it again to stop at once)",
                name, options.exit_timeout_s)
    server.request_stop()
    if supervisor.before_start:
        # No server yet, so nothing to drain, and what comes before it (the tiny models' build, whose cache
        # keeps only finished builds) need not be waited for; no server starts once a stop is requested.
        logger.info("stopped before tritonserver was started")
        _exit_without(EXIT_CLEAN)
    deadline_s = options.exit_timeout_s + STUB_EXIT_GRACE_S + GROUP_EXIT_WAIT_S + SUPERVISOR_MARGIN_S
    received = signals.wait(timeout_s=deadline_s)
    if received == WOKEN:
        return supervisor.exit_code
    if received is None:
        logger.error("not stopped within %.0f s: killing tritonserver's process group", deadline_s)
    else:
        logger.warning("second %s: killing tritonserver's process group now", signal.Signals(received).name)
    server.kill()
    # With its process gone the supervisor finishes at once (its state files); it is not waited for beyond
    # that, so that a supervisor stuck elsewhere (building the tiny models) cannot hold the exit up.
    if signals.wait(timeout_s=SUPERVISOR_MARGIN_S) != WOKEN:
        logger.error("the supervisor did not finish; exiting without it")
        _exit_without(EXIT_FAILED)
    return EXIT_FAILED


def _start_agent(arguments: argparse.Namespace) -> DrainAgent | None:
    if arguments.agent_port is None:
        return None
    host = arguments.listen_address
    try:
        return DrainAgent(host, arguments.agent_port)
    except OSError as error:
        raise LauncherError(f"--agent-port {arguments.agent_port}: cannot listen on {host} "
                            f"({error.strerror or error})") from None


def _exit_without(code: int) -> NoReturn:
    """Exit now, leaving behind a supervisor that cannot be interrupted (building the tiny models, in torch):
    an interpreter shutting down around a running daemon thread can abort on a lock that thread holds."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Supervisor(threading.Thread):
    """Starts the server, runs the watchdog until a stop is requested, and stops the server in order.

    Servers are started (and restarted) from this thread, which lives as long as they do: the parent-death
    signal that stops tritonserver if the launcher dies fires when the thread that started it ends.
    """

    def __init__(self, server: TritonServer, arguments: argparse.Namespace, signals: StopSignals,
                 agent: DrainAgent | None = None) -> None:
        super().__init__(name="supervisor", daemon=True)
        self.server = server
        self.arguments = arguments
        self.signals = signals
        self.agent = agent
        self.serving = False
        """True once every model has answered (READY): from then on a stop may drain first."""
        self.exit_code = EXIT_FAILED
        self.before_start = True
        """True until tritonserver is about to be started: a stop then has nothing to drain and need not wait for
        what the supervisor is doing (building the tiny models cannot be interrupted)."""

    def run(self) -> None:
        try:
            self.exit_code = self._serve()
        finally:
            self.signals.wake()

    def _serve(self) -> int:
        server = self.server
        try:
            stopped = self._start_and_watch()
        except StopRequestedError as stop:
            logger.info("%s", stop)
            stopped = True
        except Exception as error:
            if not server.stop_requested:
                server.stop()
                if isinstance(error, LauncherError):
                    print(f"scripts/serve: {error}", file=sys.stderr)
                    return EXIT_FAILED
                raise
            # E.g. a start that the stop cut short: what was asked for happened.
            logger.info("stopped while starting: %s", str(error).split("\n", 1)[0])
            stopped = True
        in_order = server.stop()
        if not stopped:
            return EXIT_FAILED
        if not in_order:
            logger.error("tritonserver did not stop in order: requests in flight were cut")
            return EXIT_FAILED
        logger.info("stopped")
        return EXIT_CLEAN

    def _start_and_watch(self) -> bool:
        """Start the server and watch it until a stop is requested (True) or it ends on its own (False)."""
        server, arguments = self.server, self.arguments
        if arguments.tiny:
            from .repository import build_tiny_repository

            logger.info("building the tiny models (cached after the first time)")
            build_tiny_repository(server.options.model_repository)
        self.before_start = False
        server.start()  # refuses once a stop is requested
        server.wait_until_ready()
        logger.info("serving %s from %s; log: %s", ", ".join(server.models), server.options.model_repository,
                    server.log_path or "stderr")
        self.serving = True
        if self.agent is not None:
            self.agent.set(ReplicaState.SERVING)
        print(f"READY {server.url}", flush=True)
        if arguments.watchdog_interval > 0:
            Watchdog(server, arguments.watchdog_interval, arguments.probe_timeout, agent=self.agent).run()
        else:
            server.wait_for_exit()
        if not server.stop_requested:
            logger.error("tritonserver exited on its own with code %s", server.returncode)
        return server.stop_requested

if __name__ == "__main__":
    sys.exit(main())
