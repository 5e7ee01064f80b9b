"""Triton servers as the capability layer sees them: one inference key per server URL, and the calls.

A key is only ever sent to the server it belongs to. The local server's key is read from the launcher's state
dir (``server.json`` says which URL it belongs to; the launcher writes a new key at every start, so it is read
again when the server answers 403); keys of other servers are registered in the store.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triton_launcher import contract
from triton_launcher.paths import INFER_KEY_FILE, INFER_KEY_HEADER, SERVER_FILE
from triton_launcher.server import state_dir_problem

from .capabilities import canonical_server_url
from .errors import (
    GenerationError,
    ModelNotServedError,
    ServerBusyError,
    ServerUnavailableError,
    TemporarilyUnavailableError,
    UnknownServerError,
)
from .store import Store

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
    """Where inference keys come from: the local launcher's state dir, then servers registered in the store."""

    def __init__(self, store: Store, state_dir: Path | None) -> None:
        self.store = store
        self.state_dir = state_dir

    def key_for(self, server_url: str) -> str:
        url = canonical_server_url(server_url)
        local = self._local_key(url)
        if local is not None:
            return local
        row = self.store.read().execute("SELECT infer_key FROM servers WHERE url = ?", (url,)).fetchone()
        if row is not None:
            return str(row["infer_key"])
        where = f" in {self.state_dir}" if self.state_dir else ""
        raise UnknownServerError(
            f"no inference key is known for {url}: no server started by scripts/serve{where} runs there, and "
            f"none is registered; register it with: python -m capability register-server --url {url} "
            "--key-file FILE"
        )

    def register(self, server_url: str, key: str) -> str:
        url = canonical_server_url(server_url)
        if not key.strip():
            raise UnknownServerError(f"the key for {url} is empty")
        with self.store.write() as db:
            db.execute("INSERT OR REPLACE INTO servers (url, infer_key, registered_at) VALUES (?, ?, ?)",
                       (url, key.strip(), time.time()))
        return url

    def _local_key(self, url: str) -> str | None:
        if self.state_dir is None or not self.state_dir.is_dir():
            return None
        problem = state_dir_problem(self.state_dir)
        if problem:  # whoever could write server.json could have the key sent to a server of theirs
            raise UnknownServerError(problem)
        try:
            description = json.loads((self.state_dir / SERVER_FILE).read_text(encoding="utf-8"))
            if canonical_server_url(str(description.get("url", ""))) != url:
                return None
            return (self.state_dir / INFER_KEY_FILE).read_text(encoding="utf-8").strip() or None
        except (OSError, ValueError):
            return None


@dataclass(frozen=True)
class ServedModels:
    by_model_id: dict[str, str]
    """model_id parameter → Triton model name."""
    fetched_at: float


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

    def resolve(self, model_id: str) -> str:
        """The Triton model that serves ``model_id`` (its config parameter), refreshed when unknown."""
        models = self._models
        age = None if models is None else time.monotonic() - models.fetched_at
        # Refetch when stale, or for an unknown id if the map is not brand new (a model may have just been
        # added), but not on every request naming a model that does not exist.
        if models is None or age is None or age > MODEL_MAP_TTL_S or (
                model_id not in models.by_model_id and age > UNKNOWN_MODEL_REFETCH_S):
            models = self._models = self._fetch_models()
        try:
            return models.by_model_id[model_id]
        except KeyError:
            raise ModelNotServedError(
                f"model {model_id!r} is not served at {self.url}; it serves {sorted(models.by_model_id)}"
            ) from None

    def generate(self, triton_model: str, request: contract.TextToImage) -> contract.GeneratedImage:
        result = self._call(lambda client, headers: client.infer(
            triton_model, request.http_inputs(), outputs=contract.http_outputs(), headers=headers))
        return contract.read_result(result)

    def _fetch_models(self) -> ServedModels:
        def fetch(client: Any, headers: dict[str, str]) -> dict[str, str]:
            served = {}
            for entry in client.get_model_repository_index(headers=headers):
                if entry.get("state") != "READY":
                    continue
                config = client.get_model_config(entry["name"], headers=headers)
                model_id = config.get("parameters", {}).get("model_id", {}).get("string_value")
                if model_id:
                    served[model_id] = entry["name"]
            return served

        return ServedModels(by_model_id=self._call(fetch), fetched_at=time.monotonic())

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            import tritonclient.http

            scheme, _, address = self.url.partition("://")
            client = tritonclient.http.InferenceServerClient(
                address, ssl=scheme == "https", connection_timeout=CLIENT_TIMEOUT_S,
                network_timeout=CLIENT_TIMEOUT_S,
            )
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _drop_client(self) -> None:
        """Forget this thread's client after a broken connection: the next call opens a new one."""
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            with self._clients_lock:
                if client in self._clients:
                    self._clients.remove(client)
            client.close()

    def _call(self, call: Any) -> Any:
        from tritonclient.utils import InferenceServerException

        for attempt in (1, 2):
            headers = {INFER_KEY_HEADER: self.keys.key_for(self.url)}
            try:
                return call(self._client(), headers)
            except InferenceServerException as error:
                status, message = error.status(), error.message() or str(error)
                if status == "403" and attempt == 1:
                    continue  # the local server restarted with a new key: read it again, once
                if status == "403":
                    raise ServerUnavailableError(f"{self.url} refused the inference key: {message}") from None
                if status == "400":
                    raise GenerationError(f"the server refused the request: {_as_options(message)}") from None
                if status == "503" and (reason := _queue_refusal(message)) is not None:
                    raise ServerBusyError(f"{self.url} is busy: {reason}; retry later") from None
                if status is None or status == "503" or _STUB_DIED in message:  # no answer, or a broken one
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


# Triton's own words for the refusals of a model's default_queue_policy (HTTP 503).
_QUEUE_FULL = "Exceeds maximum queue size"
_QUEUE_TIMEOUT = "Request timeout expired"


def _queue_refusal(message: str) -> str | None:
    """Why Triton refused for the model's queue, in our words; None if that is not why."""
    if _QUEUE_FULL in message:
        return "the model's queue is full (its max_queue_size)"
    if _QUEUE_TIMEOUT in message:
        return "the request waited in the model's queue past its timeout (default_timeout_microseconds)"
    return None


def _as_options(message: str) -> str:
    for input_name, option in OPTION_OF_INPUT.items():
        if message.startswith(f"{input_name}=") or message.startswith(f"{input_name} "):
            return option + message[len(input_name):]
    return message
