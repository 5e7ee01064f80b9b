"""A real HAProxy (Debian's package) for the tests and the benchmarks, run with a given configuration.

The configuration is the Helm chart's own, rendered with values that put the replicas on loopback; this module adds
only an admin socket in a scratch directory, through which it reads each server's state and counters (HAProxy's
``show stat``) and which tests can use as operators do.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HAPROXY = "haproxy"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


def haproxy_binary() -> str | None:
    return shutil.which(HAPROXY) or next((str(path) for path in (Path("/usr/sbin/haproxy"),) if path.exists()), None)


class HAProxyError(RuntimeError):
    pass


@dataclass(frozen=True)
class LoggedRequest:
    """One line of HAProxy's HTTP log: where the request went and how it ended."""

    backend: str
    server: str
    status: str
    retries: str
    """HAProxy's retry count for the request; a leading ``+`` means it was redispatched to another server."""
    method: str
    path: str


# HAProxy's HTTP log format (configuration manual, "HTTP log format"): client, date, frontend, backend/server,
# timers, status, bytes, cookies, termination state, connection counts, queue counts ending with retries
# (actconn/feconn/beconn/srv_conn/retries), then the request line in quotes.
_HTTPLOG = re.compile(r'^\S+ \[[^]]+\] \S+ ([^/\s]+)/(\S+) \S+ (-?\d+) \S+ \S+ \S+ \S+ '
                      r'\d+/\d+/\d+/\d+/(\+?\d+) \S+ "(\S+) (\S+)', re.MULTILINE)


class HAProxy:
    """``haproxy -db -f CONFIG`` in the foreground, with an admin socket; :meth:`servers` reads ``show stat``."""

    def __init__(self, config: str, environment: Mapping[str, str] | None = None, scratch: Path | None = None) -> None:
        """``scratch``: where the configuration, the socket and the log go (kept); default: a temporary directory,
        removed on :meth:`stop`."""
        binary = haproxy_binary()
        if binary is None:
            raise HAProxyError("no haproxy binary: scripts/test installs Debian's haproxy package "
                               "(apt-get install haproxy)")
        self.binary = binary
        self._own_scratch = scratch is None
        self.scratch = Path(tempfile.mkdtemp(prefix="haproxy-")) if scratch is None else scratch
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.socket_path = self.scratch / "admin.sock"
        self.config_path = self.scratch / "haproxy.cfg"
        # HAProxy merges several global sections: the admin socket is added without touching the chart's text.
        self.config_path.write_text(f"{config.rstrip()}\n\nglobal\n    stats socket {self.socket_path} mode 600 "
                                    "level admin\n")
        self.log_path = self.scratch / "haproxy.log"
        self.environment = {**os.environ, **(environment or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def check(self) -> None:
        """``haproxy -c``: the configuration is valid (HAProxyError with HAProxy's words if not)."""
        checked = subprocess.run([self.binary, "-c", "-f", str(self.config_path)], env=self.environment,
                                 capture_output=True, text=True, timeout=60, check=False)
        if checked.returncode != 0:
            raise HAProxyError(f"haproxy -c refused {self.config_path}:\n{checked.stdout}{checked.stderr}")

    def start(self) -> None:
        self.check()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen([self.binary, "-db", "-f", str(self.config_path)], env=self.environment,
                                            stdout=log, stderr=subprocess.STDOUT)
        self.wait_for(lambda: self.socket_path.exists() and self._answers(), START_TIMEOUT_S, "its admin socket")

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGUSR1)  # a soft stop: what is in flight finishes
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.process = None
        if self._own_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> HAProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def command(self, line: str) -> str:
        """One command on the admin socket (HAProxy's management guide, "Unix Socket commands")."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(10)
            connection.connect(str(self.socket_path))
            connection.sendall(line.encode() + b"\n")
            received = b""
            while chunk := connection.recv(65536):
                received += chunk
        return received.decode()

    def servers(self, backend: str) -> dict[str, dict[str, Any]]:
        """``show stat`` of ``backend``'s servers, by name: status (UP, DOWN, DRAIN, MAINT…), stot (requests
        sent), scur (in flight), and the rest of HAProxy's columns."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {row["svname"]: row for row in rows
                if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_for(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll ``condition`` until it holds; HAProxyError naming ``what`` (and HAProxy's log) past the timeout."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.process is not None and self.process.poll() is not None:
                raise HAProxyError(f"haproxy exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise HAProxyError(f"haproxy: no {what} within {timeout_s:.0f} s:\n{self.log()}")
            time.sleep(0.05)

    def wait_for_status(self, backend: str, server: str, status: str, timeout_s: float = 60.0) -> None:
        """Until ``show stat`` gives ``backend/server`` the status ``status`` (UP, DOWN, DRAIN, MAINT), settled:
        "UP 1/2" (a check has failed once, one more and it is down) is not yet UP, "DRAIN (agent)" is DRAIN."""
        seen: list[str] = []

        def reached() -> bool:
            seen.append(self.servers(backend)[server]["status"])
            words = seen[-1].split()
            return words[0] == status and not (len(words) > 1 and "/" in words[1])

        try:
            self.wait_for(reached, timeout_s, f"{status} for {backend}/{server}")
        except HAProxyError as error:
            raise HAProxyError(f"{backend}/{server} is {seen[-1]!r}, not {status}: {error}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def requests(self) -> list[LoggedRequest]:
        """Every request HAProxy has logged so far (the chart's ``option httplog``), oldest first: health checks
        are not requests and are not in the log."""
        return [LoggedRequest(*match.groups()) for match in _HTTPLOG.finditer(self.log())]

    def _answers(self) -> bool:
        with contextlib.suppress(OSError):
            return "pxname" in self.command("show stat")
        return False

