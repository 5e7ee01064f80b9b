"""The tritonserver process: hardened flags, an inference key, readiness by real inference, clean shutdown.

Use it as a context manager so that no test or script leaks a server or its Python stubs::

    with TritonServer(ServerOptions(model_repository=TINY_REPOSITORY)) as server:
        client = server.http_client()
        ...
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from inference_client import triton
from inference_client.state import (
    INFER_KEY_FILE,
    INFER_KEY_HEADER,
    SERVER_FILE,
    STATE_DIR,
    InferKeyFileError,
    http_key_headers,
    read_infer_key_file,
    state_dir_problem,
)

from .errors import ServerStartError, StopRequestedError
from .installation import TritonInstallation, find_installation
from .paths import LOG_FILE, STATE_LOCK_FILE

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
DEFAULT_HTTP_PORT = 8000
RESTRICTED_API_GROUPS = (
    "inference", "shared-memory", "model-config", "model-repository", "statistics", "trace", "logging",
)
"""Triton API groups that need the key: all but ``health`` and ``metadata``, which probes and clients use."""
DEFAULT_EXIT_TIMEOUT_S = 30
"""Seconds in-flight requests get to finish once a stop is asked for (tritonserver's own default too)."""
MAX_EXIT_TIMEOUT_S = 3600
STUB_EXIT_GRACE_S = 5.0
"""After tritonserver's exit timeout, how long its Python stubs get to exit before the group is killed."""
RESTART_STOP_TIMEOUT_S = 10.0
"""A server restarted for a fault gets this long to finish in-flight requests. With a dead stub it does not
exit by itself (it waits for the stub's requests, which never finish), so this is how long a restart waits."""
GROUP_EXIT_WAIT_S = 10.0
"""After the kill, how long a stop waits for every process of the group to be gone (and reaped)."""
_ORDERLY_EXIT_CODES = (0, -signal.SIGTERM)
"""How tritonserver ends when it stopped in order: 0, or killed by the SIGTERM itself while it was still loading
models, before it had installed its handler (nothing was in flight then)."""
_LOG_TAIL_LINES = 40
_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class ServerOptions:
    model_repository: Path
    state_dir: Path = STATE_DIR
    http_port: int = DEFAULT_HTTP_PORT
    grpc_port: int | None = None
    """None: http_port + 1."""
    metrics_port: int | None = None
    """None: http_port + 2."""
    ready_timeout_s: float = 900.0
    """Model loading (a hub download on first start) and the probe inferences must finish within this."""
    exit_timeout_s: int = DEFAULT_EXIT_TIMEOUT_S
    """On a stop, requests in flight get this long (tritonserver's --exit-timeout-secs); the group is killed
    :data:`STUB_EXIT_GRACE_S` later if it has not exited."""
    executable: Path | None = None
    """A tritonserver binary; None: the bundled one, else the one on PATH."""
    log_file: Path | None = None
    """None: ``<state_dir>/tritonserver.log``; ``Path("-")``: this process's stderr."""
    log_verbose: int = 0
    infer_key_file: Path | None = None
    """An operator's inference key (a mounted Kubernetes Secret, say), shared by every replica and every
    capability host; None: a new random key at each start."""
    extra_args: tuple[str, ...] = field(default=())


# Loopback requests must not go through an http_proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port free on the loopback interface now (another process may take it before we do)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on the loopback interface now."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:  # all bound at once, so the kernel cannot hand out one port twice
            sock.bind((LOOPBACK, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def loopback_options(model_repository: Path, state_dir: Path, **options: Any) -> ServerOptions:
    """Options for a server on three free loopback ports (tests, demo, benchmarks)."""
    http_port, grpc_port, metrics_port = free_ports(3)
    return ServerOptions(model_repository=model_repository, state_dir=state_dir, http_port=http_port,
                         grpc_port=grpc_port, metrics_port=metrics_port, **options)


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return True
    return False


def server_ports(options: ServerOptions) -> dict[str, int]:
    http_port = options.http_port
    return {
        "http": http_port,
        "grpc": options.grpc_port if options.grpc_port is not None else http_port + 1,
        "metrics": options.metrics_port if options.metrics_port is not None else http_port + 2,
    }


def server_arguments(options: ServerOptions, installation: TritonInstallation, infer_key: str) -> list[str]:
    """The full tritonserver command line. Hardening follows Triton's secure deployment guide."""
    ports = server_ports(options)
    restricted = f"{','.join(RESTRICTED_API_GROUPS)}:{INFER_KEY_HEADER}={infer_key}"
    return [
        str(installation.executable),
        f"--model-repository={options.model_repository}",
        f"--backend-directory={installation.backend_directory}",
        # Every endpoint on loopback only; a reverse proxy or the capability layer faces the network.
        f"--http-address={LOOPBACK}", f"--http-port={ports['http']}",
        f"--grpc-address={LOOPBACK}", f"--grpc-port={ports['grpc']}",
        f"--metrics-address={LOOPBACK}", f"--metrics-port={ports['metrics']}",
        # Everything but health and metadata needs the key (Triton's API groups).
        f"--http-restricted-api={restricted}",
        f"--grpc-restricted-protocol={restricted}",
        "--model-control-mode=none",
        # Rate limiting by execution count, no resources declared: nothing is held back, but among a model's
        # free instances Triton picks the lowest executions x priority, so a config can prefer one instance
        # (repository.py gives the spare CPU instances of the tiny models priority 1000).
        "--rate-limit=execution_count",
        "--strict-readiness=true",
        "--exit-on-error=true",
        "--disable-auto-complete-config",
        f"--exit-timeout-secs={options.exit_timeout_s}",
        f"--log-verbose={options.log_verbose}",
        *options.extra_args,
    ]


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only, created so from the start (no window at 0644)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    temporary.replace(path)


def prepare_state_dir(state_dir: Path) -> None:
    """Create ``state_dir`` private (0700), or check that an existing one is ours and writable by us alone.

    Whoever can write there could swap ``server.json``'s URL and have a client send the key elsewhere.
    An existing directory is never chmod-ed: ``--state-dir /tmp`` must not change /tmp.
    """
    if not state_dir.exists():
        state_dir.mkdir(mode=0o700, parents=True)
        return
    problem = state_dir_problem(state_dir)
    if problem:
        raise ServerStartError(problem)


def _reap_group(group: int) -> None:
    """Reap the exited members of process group ``group`` that are our children: the stubs of a stopped server
    once this process is their reaper (:func:`become_subreaper`, or PID 1 in a container without an init)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-group, os.WNOHANG)[0]:
            pass


def become_subreaper() -> None:
    """Have orphaned descendants (the stubs of a tritonserver that died) reparented to this process rather than
    to PID 1, which in a container may be this process anyway or something that never reaps: the launcher reaps
    them as it stops each server (Linux prctl PR_SET_CHILD_SUBREAPER; elsewhere nothing changes)."""
    with contextlib.suppress(OSError, AttributeError):
        pr_set_child_subreaper = 36
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0)


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks the kernel to SIGTERM the child when its parent dies (Linux prctl).

    If the launcher dies without cleaning up (SIGKILL), the server then stops its stubs itself. ``prctl`` is
    looked up here, in the parent: the child between fork and exec may only make the plain call. The signal
    fires when the *thread* that started the child ends, so start servers from a long-lived thread.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


class TritonServer:
    """One tritonserver process and the state dir describing it. One start per object.

    Thread-safe where it must be: :meth:`request_stop` and :meth:`kill` may come from any thread while another
    one starts, probes or restarts the server; once a stop is requested no tritonserver is launched any more, and
    whatever waits for one gives up with StopRequestedError.
    """

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None
        self.infer_key = ""
        self.models: list[str] = []
        self.streaming_models: set[str] = set()
        """The decoupled models among :attr:`models`: they answer on gRPC streams, with progress."""
        self._log_handle: IO[bytes] | None = None
        self._state_lock: IO[bytes] | None = None
        self._stop_requested = threading.Event()
        self._killed = False
        """:meth:`kill` was called: whatever the process did then, it did not stop in order."""
        self._terminated: subprocess.Popen[bytes] | None = None
        """The process that :meth:`request_stop` sent SIGTERM to."""
        self._process_lock = threading.Lock()
        """Held to replace :attr:`process`, so that a stop sent from another thread reaches the current one."""

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.options.http_port}"

    @property
    def log_path(self) -> Path | None:
        if self.options.log_file == Path("-"):
            return None
        return self.options.log_file or self.options.state_dir / LOG_FILE

    @property
    def headers(self) -> dict[str, str]:
        """Headers every inference request must carry (a new dict each time: tritonclient adds to it)."""
        return http_key_headers(self.infer_key)

    def __enter__(self) -> TritonServer:
        try:
            self.start()
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested.is_set()

    def wait_for_stop_request(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s``, woken by :meth:`request_stop`; whether a stop has been requested."""
        return self._stop_requested.wait(timeout_s)

    def request_stop(self) -> None:
        """Begin an orderly stop, from any thread: tritonserver gets SIGTERM now (it refuses new requests and
        finishes those in flight, for up to its exit timeout), no (re)start begins any more, and a start or probe
        under way gives up. :meth:`stop` completes it."""
        self._stop_requested.set()
        with self._process_lock:
            process = self.process
            if process is not None and process.poll() is None:
                logger.info("stopping tritonserver (pid %d): requests in flight get up to %d s", process.pid,
                            self.options.exit_timeout_s)
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                self._terminated = process

    def kill(self) -> None:
        """SIGKILL tritonserver's whole process group now, from any thread: a second stop signal, or a stop that
        took too long. :meth:`stop` still cleans up after it."""
        self._stop_requested.set()
        with self._process_lock:
            process = self.process
            if process is not None and process.poll() is None:
                self._killed = True
        if process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)

    @property
    def returncode(self) -> int | None:
        process = self.process
        return None if process is None else process.poll()

    def wait_for_exit(self) -> None:
        """Block until tritonserver exits (by itself, or because a stop was requested)."""
        while True:
            process = self.process
            if process is None or process.poll() is not None or self._stop_requested.is_set():
                return
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=_POLL_SECONDS * 5)

    def command(self) -> list[str]:
        """The command line that :meth:`start` runs (the key shown as ``<infer-key>``)."""
        return server_arguments(self.options, find_installation(self.options.executable), "<infer-key>")

    def start(self) -> None:
        self._raise_if_stopping("tritonserver is not started")
        state_dir = self.options.state_dir
        prepare_state_dir(state_dir)
        self._lock_state_dir()
        self._check_ports_free()
        (state_dir / SERVER_FILE).unlink(missing_ok=True)
        self.infer_key = self._key_for_this_start()
        # Local clients (the health check, the CLI on this host) read the key where they always do.
        write_private_file(state_dir / INFER_KEY_FILE, self.infer_key + "\n")
        if self.log_path is not None:  # a fresh log per start; restarts append to it, so a crash's log is kept
            self._log_handle = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the server
        self._launch()

    def _key_for_this_start(self) -> str:
        """The operator's key if one was given; else a new one, so that a key read by a client of an earlier
        server is worth nothing now. Restarts keep the key of the start (rotation is a new start)."""
        if self.options.infer_key_file is None:
            return secrets.token_urlsafe(32)
        try:
            return read_infer_key_file(self.options.infer_key_file)
        except InferKeyFileError as error:
            raise ServerStartError(f"{error} (--infer-key-file)") from None

    def restart(self) -> None:
        """Stop the process and start it again, ready, on the same ports with the same key and state dir.

        The watchdog's remedy for a crashed stub or server. The state dir stays locked and ``server.json`` stays
        in place meanwhile, so clients see a server that is temporarily unavailable, not one that is gone. A stop
        requested meanwhile ends it with StopRequestedError, at whichever step it has reached.
        """
        self._raise_if_stopping("tritonserver is not restarted")
        self._stop_process(timeout_s=min(self.options.exit_timeout_s, RESTART_STOP_TIMEOUT_S))
        self._check_ports_free()
        self._launch()
        self.wait_until_ready()

    def _check_ports_free(self) -> None:
        # Fail before starting: otherwise readiness polls could reach whatever already listens there.
        busy = {name: port for name, port in server_ports(self.options).items() if port_in_use(port)}
        if busy:
            described = ", ".join(f"{name} port {port}" for name, port in busy.items())
            raise ServerStartError(f"{described} on {LOOPBACK} already in use (another server?); "
                                   "choose others with --http-port/--grpc-port/--metrics-port")

    def _launch(self) -> None:
        installation = find_installation(self.options.executable)
        output: IO[bytes] = sys.stderr.buffer if self._log_handle is None else self._log_handle
        arguments = server_arguments(self.options, installation, self.infer_key)
        self._raise_if_stopping("tritonserver is not started")
        # Started outside the lock, so that a stop never waits on a fork; a stop that came meanwhile is passed
        # on to the new process here, once it is published.
        process = self._popen(arguments, installation, output)
        with self._process_lock:
            self.process = process
            stopping = self._stop_requested.is_set()
        logger.info("started %s (pid %d) on %s", installation.executable, process.pid, self.url)
        if stopping:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            self._terminated = process
            self._raise_if_stopping("tritonserver was stopped as it started")

    @staticmethod
    def _popen(arguments: list[str], installation: TritonInstallation, output: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            arguments,
            env=installation.environment(),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            # Its own process group: stopping it reaches the Python stubs it spawned, and a Ctrl-C in the
            # launcher's terminal reaches the launcher only, which then stops the server in order.
            start_new_session=True,
            preexec_fn=_parent_death_signal(),  # noqa: PLW1509 - only calls prctl
        )

    def _lock_state_dir(self) -> None:
        """Hold the state dir for this server's life: a second server there would overwrite its key."""
        lock = open(self.options.state_dir / STATE_LOCK_FILE, "ab")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ServerStartError(
                f"state dir {self.options.state_dir} belongs to another running server; give this one its own "
                "(--state-dir)"
            ) from None
        self._state_lock = lock

    def wait_until_ready(self) -> None:
        """Block until every model is ready and has answered a real inference, or raise ServerStartError."""
        deadline = time.monotonic() + self.options.ready_timeout_s
        while not self._http_ok("/v2/health/ready"):
            self._check_alive()
            if time.monotonic() > deadline:
                raise ServerStartError(self._with_log(f"not ready after {self.options.ready_timeout_s:.0f} s"))
            if self._stop_requested.wait(_POLL_SECONDS):
                self._raise_if_stopping("the models were still loading")
        try:
            self.models = self._ready_models()
            self.streaming_models = {model for model in self.models if self._is_decoupled(model)}
        except (OSError, ValueError) as error:  # urllib's errors are OSErrors; a broken answer a ValueError
            self._raise_if_stopping(f"the server stopped answering ({error})")
            self._check_alive()
            raise ServerStartError(self._with_log(f"reading the model repository failed: {error}")) from error
        if not self.models:
            raise ServerStartError(self._with_log(f"no model in {self.options.model_repository} is ready"))
        # A ready model can still be broken (a dead stub answers readiness: Triton issue 8604): only a real
        # inference on each model proves it serves.
        for model in self.models:
            self.probe(model, timeout_s=max(1.0, deadline - time.monotonic()))
        self._write_server_file()

    def probe(self, model: str, timeout_s: float = 300.0) -> None:
        """One small real inference on ``model``; raise ServerStartError unless it returns a right-sized image,
        StopRequestedError if a stop was asked for before or while it ran."""
        self._raise_if_stopping(f"{model} is not probed")
        try:
            image = triton.probe_inference(f"{LOOPBACK}:{self.options.http_port}",
                                           f"{LOOPBACK}:{server_ports(self.options)['grpc']}", model, self.infer_key,
                                           streaming=model in self.streaming_models, timeout_s=timeout_s)
        except Exception as error:
            self._raise_if_stopping(f"the probe of {model} ended with the server ({error})")
            self._check_alive()
            raise ServerStartError(self._with_log(f"probe inference on {model!r} failed: {error}")) from error
        if image.shape != (triton.PROBE_SIDE, triton.PROBE_SIDE, 3):
            raise ServerStartError(f"probe inference on {model!r} returned an image of shape {image.shape}")

    def http_client(self, timeout_s: float = 600.0, concurrency: int = 1) -> Any:
        """A ``tritonclient.http.InferenceServerClient`` for this server; pass :attr:`headers` to ``infer``."""
        return triton.http_client(f"{LOOPBACK}:{self.options.http_port}", timeout_s=timeout_s,
                                  concurrency=concurrency)

    def stop(self) -> bool:
        """SIGTERM (Triton refuses new requests, finishes those in flight within its exit timeout and stops its
        stubs), then SIGKILL whatever is left of the group; release the state dir. Whether tritonserver exited
        by itself in time (True also when it was not running; False when it was killed, here or by :meth:`kill`)."""
        self._stop_requested.set()
        exited = self._stop_process(timeout_s=self.options.exit_timeout_s + STUB_EXIT_GRACE_S)
        if self._state_lock is not None:  # only the server that holds the state dir may clear it
            (self.options.state_dir / SERVER_FILE).unlink(missing_ok=True)
            self._state_lock.close()
            self._state_lock = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        return exited and not self._killed

    def _stop_process(self, timeout_s: float) -> bool:
        """Stop the current process (SIGTERM, up to ``timeout_s``, then SIGKILL of its group); whether it stopped
        in order: by itself, in time, and with an exit code that says it finished what it had."""
        with self._process_lock:
            process = self.process
        if process is None:
            return True
        exited = True
        # Sent SIGTERM, here or by request_stop(): then its exit code says whether it finished in order. One that
        # had crashed, or failed to start, before is not judged here.
        stopped_by_us = process.poll() is None or process is self._terminated
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver did not stop within %.0f s; killing it", timeout_s)
                exited = False
        if exited and stopped_by_us and process.returncode not in _ORDERLY_EXIT_CODES:
            # After "Exit timeout expired. Exiting immediately." tritonserver 2.51 exits 1, or crashes (-11, seen).
            logger.warning("tritonserver ended with code %s on the stop, not in order: its exit timeout (%d s) ran "
                           "out with requests in flight, or it failed while stopping", process.returncode,
                           self.options.exit_timeout_s)
            exited = False
        # Whatever is left of its group (a hung stub) goes too: nothing outlives the launcher.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        with self._process_lock:
            if self.process is process:
                self.process = None
        # The stubs die with the group, but a restart must not start loading models while they still hold
        # their GPU memory: wait (bounded: an unreaped zombie also counts) until the group is gone.
        deadline = time.monotonic() + GROUP_EXIT_WAIT_S
        while time.monotonic() < deadline:
            _reap_group(process.pid)
            try:
                os.killpg(process.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(_POLL_SECONDS / 2)
        return exited

    def _raise_if_stopping(self, what: str) -> None:
        if self._stop_requested.is_set():
            raise StopRequestedError(f"stop requested: {what}")

    def _check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self._raise_if_stopping("tritonserver exited during start-up")
            code = None if self.process is None else self.process.returncode
            raise ServerStartError(self._with_log(f"tritonserver exited during start-up (exit code {code})"))

    def _http_ok(self, path: str) -> bool:
        try:
            with _DIRECT.open(self.url + path, timeout=5) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _ready_models(self) -> list[str]:
        request = urllib.request.Request(  # noqa: S310 - our own loopback URL
            self.url + "/v2/repository/index", data=b"{}", method="POST", headers=self.headers
        )
        with _DIRECT.open(request, timeout=10) as response:
            index = json.load(response)
        return sorted(entry["name"] for entry in index if entry.get("state") == "READY")

    def _is_decoupled(self, model: str) -> bool:
        request = urllib.request.Request(self.url + f"/v2/models/{model}/config",  # noqa: S310 - our loopback URL
                                         headers=self.headers)
        with _DIRECT.open(request, timeout=10) as response:
            config = json.load(response)
        return bool(config.get("model_transaction_policy", {}).get("decoupled", False))

    def _write_server_file(self) -> None:
        assert self.process is not None
        description = {
            "url": self.url,
            "grpc_address": f"{LOOPBACK}:{server_ports(self.options)['grpc']}",
            "streaming_models": sorted(self.streaming_models),
            "pid": self.process.pid,
            "models": self.models,
            "model_repository": str(self.options.model_repository),
            "infer_key_file": INFER_KEY_FILE,
            "infer_key_header": INFER_KEY_HEADER,
        }
        write_private_file(self.options.state_dir / SERVER_FILE, json.dumps(description, indent=2) + "\n")

    def _with_log(self, message: str) -> str:
        log_path = self.log_path
        if log_path is None or not log_path.is_file():
            return message
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-_LOG_TAIL_LINES:]
        return f"{message}\n--- last lines of {log_path} ---\n" + "\n".join(lines)
