"""The capability service (``python -m capability serve``) as a real process, for tests and benchmarks.

Started on a free loopback port (``--port 0``: the service binds it and says which in its READY line), with its
log in a file; stopped with SIGTERM as Kubernetes stops it, and its exit status checked by whoever cares.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0


class ServiceProcess:
    """One ``python -m capability serve`` process."""

    def __init__(self, state_dir: Path, log_path: Path, *, store: str | None = None,
                 extra_arguments: tuple[str, ...] = (), environment: dict[str, str] | None = None) -> None:
        self.state_dir = state_dir
        self.log_path = log_path
        self.store = store
        self.extra_arguments = extra_arguments
        self.environment = environment
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "capability", "serve", "--port", "0", "--state-dir", str(self.state_dir)]
        if self.store is not None:
            command += ["--store", self.store]
        return command + list(self.extra_arguments)

    def start(self, timeout_s: float = START_TIMEOUT_S) -> ServiceProcess:
        """Start it and wait for its READY line."""
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=log, text=True,
                                            env={**os.environ, **(self.environment or {})})
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        line = self.process.stdout.readline().strip() if ready else ""
        if not line.startswith("READY http://"):
            self.kill()
            raise RuntimeError(f"the capability service did not start ({line!r}):\n{self.log()}")
        self.url = line.removeprefix("READY ")
        return self

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then its exit status (SIGKILL after ``timeout_s``)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"the capability service did not stop within {timeout_s} s:\n{self.log()}") from None
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()

    def kill(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            if self.process.stdout is not None:
                self.process.stdout.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> ServiceProcess:
        return self.start() if self.process is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def request(self, method: str, path: str, token: str | None = None, body: Any = None,
                timeout_s: float = 300.0) -> tuple[int, dict[str, str], Any]:
        """One JSON request: (status, headers, decoded body)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - our own loopback URL
                return response.status, dict(response.headers), json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), json.loads(error.read() or b"null")



class EventStream:
    """A server-sent event stream from the service, read event by event (``http.client``: no buffering)."""

    def __init__(self, url: str, path: str, token: str, body: Any, timeout_s: float = 300.0) -> None:
        parts = urllib.parse.urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout_s)
        self.connection.request("POST", path, body=json.dumps(body),
                                headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}",
                                         "Accept": "text/event-stream"})
        self.response = self.connection.getresponse()
        self.status = self.response.status

    def error(self) -> Any:
        """The JSON error of a stream refused before it started."""
        return json.loads(self.response.read())

    def next_event(self) -> tuple[str, Any]:
        """The next event and its decoded data; ("", None) at the end of the stream."""
        name, data = "", list[str]()
        while True:
            line = self.response.readline().decode("utf-8")
            if not line:
                return "", None
            line = line.rstrip("\r\n")
            if not line:
                if data:
                    return name or "message", json.loads("\n".join(data))
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)

    def close(self) -> None:
        self.response.close()
        self.connection.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
