"""Triton servers as the capability layer sees them: one inference key per server URL, and the calls.

A key is only ever sent to the server it belongs to. The local server's key is read from the launcher's state
dir (``server.json`` says which URL it belongs to; the launcher writes a new key at every start, so it is read
again when the server answers 403); keys of other servers are registered in the store.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from inference_client import contract, triton
from inference_client.contract import Progress
from inference_client.state import (
    InferKeyFileError,
    NoServerError,
    ServerDescription,
    StateDirError,
    UntrustedStateDirError,
    http_key_headers,
    read_infer_key_file,
    read_server_description,
)

from .capabilities import canonical_server_url
from .errors import (
    CapabilityError,
    GenerationCancelledError,
    GenerationError,
    InvalidParamsError,
    ModelNotServedError,
    RequestRefusedError,
    ServerBusyError,
    ServerError,
    ServerUnavailableError,
    TemporarilyUnavailableError,
    UnknownServerError,
)
from .store import Store

Result = TypeVar("Result")

CLIENT_TIMEOUT_S = 900.0
"""Generations take seconds to minutes; tritonclient's default of 60 s would cut long ones off."""
MODEL_MAP_TTL_S = 30.0
UNKNOWN_MODEL_REFETCH_S = 2.0

# The server's field names, as the camelCase options they come from, for error messages.
OPTION_OF_INPUT = {
    "NEGATIVE_PROMPT": "negativePrompt", "NUM_INFERENCE_STEPS": "numInferenceSteps",
    "GUIDANCE_SCALE": "guidanceScale", "PROMPT": "prompt", "WIDTH": "width", "HEIGHT": "height", "SEED": "seed",
}


class ServerKeys:
    """Where inference keys come from: the local launcher's state dir, then servers registered in the store.

    A SQLite store (one host, a private file) keeps a registered key itself. A PostgreSQL store, which every
    application host reads, keeps only the path of a key file instead (a Kubernetes Secret mounted at the same
    path on every host, say), read when the key is needed: the key is never in the database.
    """

    def __init__(self, store: Store, state_dir: Path | None) -> None:
        self.store = store
        self.state_dir = state_dir

    def key_for(self, server_url: str) -> str:
        url = canonical_server_url(server_url)
        local = self._local_key(url)
        if local is not None:
            return local
        column = "infer_key" if self.store.stores_secrets else "infer_key_file"
        row = self.store.read().execute(f"SELECT {column} FROM servers WHERE url = ?", (url,)).fetchone()  # noqa: S608 - a column name of ours
        if row is not None:
            return str(row[column]) if self.store.stores_secrets else _read_key_file(Path(row[column]), url)
        where = f" in {self.state_dir}" if self.state_dir else ""
        raise UnknownServerError(
            f"no inference key is known for {url}: no server started by scripts/serve{where} runs there, and "
            f"none is registered; register it with: python -m capability register-server --url {url} "
            "--key-file FILE"
        )

    def register(self, server_url: str, key_file: Path, grpc_address: str | None = None) -> str:
        """Register the server at ``server_url`` with the key in ``key_file``: the key itself in a store that may
        keep secrets (SQLite), else the file's absolute path, which every host must then be able to read."""
        url = canonical_server_url(server_url)
        # absolute(), not resolve(): a Kubernetes Secret's file is a chain of links whose target (..<timestamp>/KEY)
        # differs on every pod and vanishes when the Secret is rotated; the mounted path is what every host shares.
        key_file = key_file.absolute()
        key = _read_key_file(key_file, url)
        if grpc_address is not None:
            grpc_address = canonical_grpc_address(grpc_address, url)
        column = "infer_key" if self.store.stores_secrets else "infer_key_file"
        with self.store.write() as db:
            # Registering a new key keeps a gRPC address registered before, unless a new one is given.
            db.execute(f"INSERT INTO servers (url, {column}, registered_at, grpc_address) VALUES (?, ?, ?, ?) "  # noqa: S608 - a column name of ours
                       f"ON CONFLICT (url) DO UPDATE SET {column} = excluded.{column}, registered_at = "
                       "excluded.registered_at, grpc_address = COALESCE(excluded.grpc_address, servers.grpc_address)",
                       (url, key if self.store.stores_secrets else str(key_file), time.time(), grpc_address))
        return url

    def grpc_address(self, server_url: str) -> str:
        """``host:port`` of the gRPC endpoint of the server at ``server_url``: streaming needs it."""
        url = canonical_server_url(server_url)
        if url.startswith("https:"):
            raise UnknownServerError(
                f"{url} is served over TLS, but progress and cancellation use plain gRPC, which would carry the "
                "key unencrypted: generate without progress there, or reach the server through a tunnel")
        description = self._local_description(url)
        # The key goes there too: even the launcher's own description must name the URL's host.
        address = None if description is None else canonical_grpc_address(description.grpc_address, url)
        if address is None:
            row = self.store.read().execute("SELECT grpc_address FROM servers WHERE url = ?", (url,)).fetchone()
            address = None if row is None else row["grpc_address"]
        if not isinstance(address, str) or not address:
            raise UnknownServerError(
                f"the gRPC address of {url} is not known: progress and cancellation need it; a server started by "
                f"scripts/serve{f' in {self.state_dir}' if self.state_dir else ''} publishes it, and another one's "
                f"is registered with: python -m capability register-server --url {url} --key-file FILE "
                "--grpc-address HOST:PORT"
            )
        return address

    def _local_description(self, url: str) -> ServerDescription | None:
        """The launcher's server in the state dir, if it serves ``url``."""
        if self.state_dir is None or not self.state_dir.is_dir():
            return None
        try:
            description = read_server_description(self.state_dir)
        except UntrustedStateDirError as error:  # whoever could write there could have the key sent elsewhere
            raise UnknownServerError(str(error)) from None
        except (NoServerError, StateDirError):
            return None
        return description if canonical_server_url(description.url) == url else None

    def _local_key(self, url: str) -> str | None:
        description = self._local_description(url)
        return None if description is None else description.infer_key


def _read_key_file(path: Path, url: str) -> str:
    try:
        return read_infer_key_file(path)
    except InferKeyFileError as error:
        raise UnknownServerError(f"{error} (the key of {url}): every host that uses this server needs the key at "
                                 "that path (e.g. a mounted Kubernetes Secret)") from None


def canonical_grpc_address(address: str, server_url: str) -> str:
    """``host:port`` of the gRPC endpoint of the server at ``server_url``, checked: the same host as the URL
    (the key goes to this address too, so it must be that server's) and a TCP port. IPv6 hosts in brackets."""
    rule = "must be HOST:PORT on the server's own host, e.g. 127.0.0.1:8001 ([::1]:8001 for IPv6)"
    host, _, port = address.strip().rpartition(":")
    bare_host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if (not host or not port.isdigit() or not 1 <= int(port) <= 65535 or any(c in host for c in "/@ ?#")
            or (":" in bare_host and bare_host == host)):
        raise InvalidParamsError(f"grpc_address={address!r} is invalid: {rule}")
    url_host = urllib.parse.urlsplit(server_url).hostname or ""
    if bare_host.lower() != url_host.lower():
        raise InvalidParamsError(f"grpc_address={address!r} is invalid: its host is not {url_host!r}, the host "
                                 f"of {server_url}: {rule}")
    return f"{host.lower()}:{int(port)}"


@dataclass(frozen=True)
class ServedModels:
    by_model_id: dict[str, str]
    """model_id parameter → Triton model name."""
    fetched_at: float
    streaming_by_model_id: dict[str, str] = field(default_factory=dict)
    """model_id parameter → the Triton model of its streaming (decoupled) variant."""


class TritonGateway:
    """Calls to one server with its key. Thread-safe: each thread gets its own tritonclient client."""

    def __init__(self, server_url: str, keys: ServerKeys) -> None:
        self.url = canonical_server_url(server_url)
        self.keys = keys
        self._local = threading.local()
        self._models: ServedModels | None = None
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()

    def close(self) -> None:
        """Close every thread's connection: Triton waits for open connections before it can stop."""
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()

    def resolve(self, model_id: str, streaming: bool = False) -> str:
        """The Triton model that serves ``model_id`` (its config parameter), refreshed when unknown;
        ``streaming``: its streaming variant, which reports progress and can be cancelled."""
        models = self._models
        age = None if models is None else time.monotonic() - models.fetched_at

        def served(models: ServedModels) -> dict[str, str]:
            return models.streaming_by_model_id if streaming else models.by_model_id

        # Refetch when stale, or for an unknown id if the map is not brand new (a model may have just been
        # added), but not on every request naming a model that does not exist.
        if models is None or age is None or age > MODEL_MAP_TTL_S or (
                model_id not in served(models) and age > UNKNOWN_MODEL_REFETCH_S):
            models = self._models = self._fetch_models()
        if model_id in served(models):
            return served(models)[model_id]
        if streaming and model_id in models.by_model_id:
            raise ModelNotServedError(
                f"model {model_id!r} has no streaming variant at {self.url}, so no progress or cancellation: serve "
                f"one beside it (a copy of its folder as {models.by_model_id[model_id]}-stream with "
                "model_transaction_policy {{ decoupled: true }}: scripts/add_model --streaming writes it); "
                f"streaming ones: {sorted(models.streaming_by_model_id)}")
        raise ModelNotServedError(
            f"model {model_id!r} is not served at {self.url}; it serves {sorted(models.by_model_id)}"
        )

    def generate(self, triton_model: str, request: contract.TextToImage) -> contract.GeneratedImage:
        # Not kept alive: an application host outlives many server stops, and an idle connection of its own would
        # hold each of them up until tritonserver's exit timeout (triton.CLOSE_CONNECTION).
        return self._call(lambda client, key: triton.infer_http(client, triton_model, request, key, keep_alive=False))

    def generate_streaming(self, triton_model: str, request: contract.TextToImage,
                           on_progress: Callable[[Progress], None] | None,
                           cancellation: Cancellation | None) -> contract.GeneratedImage:
        """Generate on a streaming variant over gRPC: ``on_progress`` hears of every denoising step, and
        ``cancellation.cancel()`` cancels the call, which stops the server's work after the current step."""
        from tritonclient.utils import InferenceServerException

        for attempt in (1, 2):
            key = self.keys.key_for(self.url)
            last: Progress | None = None
            try:
                with triton.ImageStream(self.keys.grpc_address(self.url), triton_model, request, key,
                                        CLIENT_TIMEOUT_S) as stream:
                    if cancellation is not None:
                        cancellation.bind(stream)
                    for event in stream:
                        if isinstance(event, contract.GeneratedImage):
                            return event
                        last = event
                        if on_progress is not None:
                            on_progress(event)
                raise GenerationError(f"{self.url} ended the stream without an image")
            except (InferenceServerException, triton.StreamCancelledError, triton.StreamError) as error:
                if cancellation is not None and cancellation.cancelled:
                    where = "" if last is None else f" at step {last.steps_done} of {last.steps}"
                    raise GenerationCancelledError(
                        f"cancelled by the caller{where}; the server stops after the step it is at") from None
                failure = self._stream_failure(error)
                if type(failure) is ServerUnavailableError and attempt == 1:
                    continue  # the local server restarted with a new key: read it again, once
                raise failure from None
        raise AssertionError("unreachable")

    def _stream_failure(self, error: Exception) -> CapabilityError:
        """What a broken stream means for the caller."""
        if isinstance(error, triton.StreamError):
            return GenerationError(f"{self.url} sent a malformed stream: {error}")
        if isinstance(error, triton.StreamCancelledError):  # only a Cancellation cancels, and it was not asked
            return GenerationError(f"the stream to {self.url} was cancelled: {error}")
        status, message = error.status(), _without_request_id(error.message() or str(error))  # type: ignore[attr-defined]
        if "protocol is restricted" in message:
            return ServerUnavailableError(f"{self.url} refused the inference key: {message}")
        if status is None:  # the model's own error response
            return self._stream_error(message)
        if status in ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"):
            return TemporarilyUnavailableError(_unavailable(self.url, message))
        return GenerationError(f"the server failed the request ({status.removeprefix('StatusCode.')}): {message}")

    def _stream_error(self, message: str) -> ServerError:
        if (reason := _queue_refusal(message)) is not None:
            return ServerBusyError(f"{self.url} is busy: {reason}; retry later")
        if _STUB_DIED in message:
            return TemporarilyUnavailableError(_unavailable(self.url, message))
        if _INVALID in message:  # the model's own check (INVALID_ARG), worded as every refusal is
            return RequestRefusedError(f"the server refused the request: {_as_options(message)}")
        return GenerationError(f"the server failed the request: {_as_options(message)}")

    def _fetch_models(self) -> ServedModels:
        def fetch(client: Any, key: str) -> tuple[dict[str, str], dict[str, str]]:
            headers = {**http_key_headers(key), **triton.CLOSE_CONNECTION}
            served: dict[str, str] = {}
            streaming: dict[str, str] = {}
            for entry in client.get_model_repository_index(headers=headers):
                if entry.get("state") != "READY":
                    continue
                config = client.get_model_config(entry["name"], headers=headers)
                model_id = config.get("parameters", {}).get("model_id", {}).get("string_value")
                decoupled = config.get("model_transaction_policy", {}).get("decoupled", False)
                if model_id:
                    (streaming if decoupled else served)[model_id] = entry["name"]
            return served, streaming

        served, streaming = self._call(fetch)
        return ServedModels(by_model_id=served, fetched_at=time.monotonic(), streaming_by_model_id=streaming)

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            scheme, _, address = self.url.partition("://")
            client = triton.http_client(address, timeout_s=CLIENT_TIMEOUT_S, ssl=scheme == "https")
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def drop_thread_client(self) -> None:
        """Close this thread's client, if it has one (see TextToImage.release_thread_clients)."""
        self._drop_client()

    def _drop_client(self) -> None:
        """Forget this thread's client after a broken connection: the next call opens a new one."""
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            with self._clients_lock:
                if client in self._clients:
                    self._clients.remove(client)
            client.close()

    def _call(self, call: Callable[[Any, str], Result]) -> Result:
        """``call(client, key)`` with this thread's HTTP client and the server's key, its errors as ours."""
        from tritonclient.utils import InferenceServerException

        for attempt in (1, 2):
            key = self.keys.key_for(self.url)
            try:
                return call(self._client(), key)
            except InferenceServerException as error:
                status, message = error.status(), error.message() or str(error)
                if status == "403" and attempt == 1:
                    continue  # the local server restarted with a new key: read it again, once
                if status == "403":
                    raise ServerUnavailableError(f"{self.url} refused the inference key: {message}") from None
                if status == "400":  # the model's INVALID_ARG: its own rules, not a failure
                    raise RequestRefusedError(f"the server refused the request: {_as_options(message)}") from None
                if status == "503" and (reason := _queue_refusal(message)) is not None:
                    raise ServerBusyError(f"{self.url} is busy: {reason}; retry later") from None
                # No answer, a broken one, or a proxy in front of the replicas that got none (502, 504: Triton
                # itself never answers with them; the chart's HAProxy does when a replica dies mid-answer).
                if status is None or status in ("502", "503", "504") or _STUB_DIED in message:
                    self._drop_client()
                    raise TemporarilyUnavailableError(_unavailable(self.url, message)) from None
                raise GenerationError(f"the server failed the request ({status}): {message}") from None
            except (OSError, http.client.HTTPException) as error:  # geventhttpclient's closed connections too
                self._drop_client()
                raise TemporarilyUnavailableError(_unavailable(self.url, str(error))) from None
        raise AssertionError("unreachable")


# Triton's words when a model's Python stub has died (HTTP 500; Triton 2.51 does not restart it).
_STUB_DIED = "is not healthy"


def _unavailable(url: str, reason: str) -> str:
    return (f"{url} is temporarily unavailable ({reason}): the launcher's watchdog restarts a crashed server; "
            "retry shortly (the layer retries requests that carry a seed by itself)")




def _queue_refusal(message: str) -> str | None:
    """Why Triton refused for the model's queue, in our words; None if that is not why."""
    if triton.QUEUE_FULL in message:
        return "the model's queue is full (its max_queue_size)"
    if triton.QUEUE_TIMEOUT in message:
        return "the request waited in the model's queue past its timeout (default_timeout_microseconds)"
    return None


class Cancellation:
    """Cancels a streaming generation from any thread: before it starts, or while it runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stream: triton.ImageStream | None = None
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled.set()
            stream = self._stream
        if stream is not None:
            stream.cancel()

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s``, woken by a cancel; whether it was cancelled."""
        return self._cancelled.wait(timeout_s)

    def bind(self, stream: triton.ImageStream) -> None:
        """The stream that a :meth:`cancel` must cancel (one already requested cancels it at once)."""
        with self._lock:
            self._stream = stream
            cancelled = self.cancelled
        if cancelled:
            stream.cancel()


def _without_request_id(message: str) -> str:
    # Triton prefixes errors of streamed requests with "[request id: <id>] ".
    if message.startswith("[request id:"):
        return message.split("] ", 1)[-1]
    return message


_INVALID = " is invalid: "
"""How the model words a refusal of a request (as this layer does): "NAME=VALUE is invalid: RULE"."""


def _as_options(message: str) -> str:
    for input_name, option in OPTION_OF_INPUT.items():
        if message.startswith(f"{input_name}=") or message.startswith(f"{input_name} "):
            return option + message[len(input_name):]
    return message
