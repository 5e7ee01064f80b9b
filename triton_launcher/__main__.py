"""``scripts/serve``: run tritonserver on a model repository until SIGINT or SIGTERM.

Prints exactly one line on stdout, ``READY http://127.0.0.1:PORT``, once every model has answered a real
inference; everything else goes to stderr and the server log. Then the watchdog (watchdog.py) probes the
models and restarts tritonserver on a crash, on the same port with the same key.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from inference_client.state import STATE_DIR

from .errors import LauncherError
from .paths import MODEL_REPOSITORY, TINY_REPOSITORY
from .server import DEFAULT_HTTP_PORT, LOOPBACK, ServerOptions, TritonServer
from .watchdog import DEFAULT_INTERVAL_S, DEFAULT_PROBE_TIMEOUT_S, Watchdog

logger = logging.getLogger("triton_launcher")


ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - only for a container, whose published ports decide who reaches it
LISTEN_ADDRESSES = (LOOPBACK, ALL_INTERFACES)
"""Both include loopback, where the launcher's probes and the watchdog connect; nothing else is offered."""


def listen_arguments(address: str) -> tuple[str, ...]:
    """tritonserver flags that move every endpoint from loopback to ``address`` (none for loopback).

    Docker forwards a published port to the container's own interface, never to its loopback, so a server in a
    container must listen there too. The flags repeat ones the launcher already sets; tritonserver takes the
    last occurrence of a flag, so the rest of the command line stays exactly that of ``scripts/serve``.
    """
    if address == LOOPBACK:
        return ()
    return (f"--http-address={address}", f"--grpc-address={address}", f"--metrics-address={address}")


class _StopRequestedError(Exception):
    def __init__(self, signal_number: int) -> None:
        super().__init__(signal.Signals(signal_number).name)


def _raise_stop(signal_number: int, _frame: FrameType | None) -> None:
    # A second Ctrl-C must not interrupt the orderly stop that the first one started.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _StopRequestedError(signal_number)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--tiny", action="store_true",
                        help="serve the tiny random-weight models (built once, cached) on the CPU")
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
    parser.add_argument("--probe-timeout", type=float, default=DEFAULT_PROBE_TIMEOUT_S, metavar="SECONDS",
                        help="a watchdog probe that has no answer after this long counts as a fault; it waits in "
                             "the model's queue like any request (default: %(default)s)")
    parser.add_argument("--listen-address", choices=LISTEN_ADDRESSES, default=LOOPBACK,
                        help="address the HTTP, gRPC and metrics endpoints listen on (default: %(default)s); "
                             "0.0.0.0 only inside a container whose ports are published on the host's loopback "
                             "(docker/compose.yaml): the launcher itself always connects through 127.0.0.1")
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
    if arguments.ready_timeout <= 0:
        parser.error(f"--ready-timeout={arguments.ready_timeout} is invalid: must be a positive number of seconds")
    if arguments.model_repository is not None and not arguments.model_repository.is_dir():
        parser.error(f"--model-repository={arguments.model_repository} is invalid: not a directory")
    return arguments


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    arguments = parse_arguments(argv)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)

    repository = arguments.model_repository or (TINY_REPOSITORY if arguments.tiny else MODEL_REPOSITORY)
    options = ServerOptions(
        model_repository=repository.resolve(),
        state_dir=arguments.state_dir.resolve(),
        http_port=arguments.http_port,
        grpc_port=arguments.grpc_port,
        metrics_port=arguments.metrics_port,
        ready_timeout_s=arguments.ready_timeout,
        executable=arguments.tritonserver,
        log_file=arguments.log_file,
        log_verbose=arguments.log_verbose,
        extra_args=listen_arguments(arguments.listen_address),
    )
    server = TritonServer(options)
    try:
        if arguments.dry_run:
            print(shlex.join(server.command()))
            return 0
        if arguments.tiny:
            from .repository import build_tiny_repository

            logger.info("building the tiny models (cached after the first time)")
            build_tiny_repository(repository)
        with server:
            logger.info("serving %s from %s; log: %s", ", ".join(server.models), repository,
                        server.log_path or "stderr")
            print(f"READY {server.url}", flush=True)
            if arguments.watchdog_interval > 0:
                # Runs until a signal interrupts it (here, in the main thread, which started the server).
                Watchdog(server, arguments.watchdog_interval, arguments.probe_timeout).run(threading.Event())
            assert server.process is not None
            code = server.process.wait()
            logger.error("tritonserver exited on its own with code %s", code)
            return 1
    except _StopRequestedError as stop:
        logger.info("%s received: stopping tritonserver", stop)
        server.stop()
        return 0
    except LauncherError as error:
        print(f"scripts/serve: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
