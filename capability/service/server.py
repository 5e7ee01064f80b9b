"""``python -m capability serve``: the service under uvicorn, on a socket bound here, READY once it serves.

It binds loopback unless told otherwise, prints one line ``READY http://HOST:PORT`` on stdout when it accepts
requests (as ``scripts/serve`` does), and on SIGTERM or Ctrl-C stops accepting, lets running requests finish for
up to ``--graceful-seconds``, cancels the generations still streaming (freeing their slots), and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Iterator

import uvicorn

from capability.layer import CapabilityLayer
from capability.store import Store

from .app import ServiceConfig, create_app

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server, saying READY once it serves, and ending with exit status 0 after a signal (uvicorn's own
    re-raises the signal after its graceful stop, so that a SIGTERM would end the process with status 143)."""

    def __init__(self, config: uvicorn.Config, url: str) -> None:
        super().__init__(config)
        self.url = url

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            print(f"READY {self.url}", flush=True)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {number: signal.signal(number, self.handle_exit) for number in signals}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``, for uvicorn to listen on.

    Made with the protocol named (IPPROTO_TCP): asyncio turns Nagle's algorithm off (TCP_NODELAY) only on the
    connections of sockets whose protocol says TCP, and with it on, every answer waited for the client's delayed
    acknowledgement: 44 ms per request on Linux, measured by scripts/bench --service."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    return listener


def serve(arguments: argparse.Namespace, store: Store) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServiceConfig(max_body_bytes=arguments.max_body_bytes, trusted_header=arguments.trusted_header,
                           trusted_proxies=tuple(arguments.trusted_proxy),
                           forwarded_from=tuple(arguments.forwarded_allow_ips))
    listener = listening_socket(arguments.host, arguments.port)
    host, port = listener.getsockname()[:2]
    url = f"http://[{host}]:{port}" if listener.family == socket.AF_INET6 else f"http://{host}:{port}"
    layer = CapabilityLayer(arguments.state_dir, store=store)
    try:
        app = create_app(layer, config)
        server = _Server(uvicorn.Config(
            app, http="httptools", loop="asyncio", lifespan="on", log_config=None,
            # Client addresses from X-Forwarded-For are read by the app itself, and only from --forwarded-allow-ips.
            proxy_headers=False, server_header=False,
            timeout_graceful_shutdown=int(arguments.graceful_seconds), timeout_keep_alive=5,
        ), url)
        server.run(sockets=[listener])
    finally:
        listener.close()
        layer.close()
    logger.info("stopped")
