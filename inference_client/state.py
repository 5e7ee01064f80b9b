"""The launcher's state dir as a client sees it: where the inference key and the server's description live,
and when the directory can be trusted with them.

The launcher (``scripts/serve``) writes a new key at every start into ``infer-key`` (mode 0600) and, once every
model has answered a real inference, ``server.json`` (its URLs and models, never the key). Whoever can write in
the state dir could name another server in ``server.json`` and have the key sent there, so a client trusts only a
directory of its own user that nobody else can write to.
"""

from __future__ import annotations

import json
import os
import re
import stat
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

STATE_DIR_VARIABLE = "TRITON_DIFFUSERS_STATE"


def default_state_dir() -> Path:
    """``$TRITON_DIFFUSERS_STATE``; else ``.state`` in the source checkout this package runs from (where
    ``scripts/serve`` puts it); else, for an installed package, ``$XDG_STATE_HOME/triton-diffusers``."""
    if os.environ.get(STATE_DIR_VARIABLE):
        return Path(os.environ[STATE_DIR_VARIABLE])
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "scripts" / "serve").is_file():
        return checkout / ".state"
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "triton-diffusers"


STATE_DIR = default_state_dir()
"""Per-server runtime state: the inference key, the server description, the log."""
INFER_KEY_FILE = "infer-key"
"""File in the state dir holding the inference API key (mode 0600)."""
SERVER_FILE = "server.json"
"""File in the state dir describing the running server: its URLs, pid and models (never the key)."""

INFER_KEY_HEADER = "infer-key"
"""HTTP header that carries the inference key: Triton's restricted-API setting names it."""
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
"""Triton's gRPC endpoint reads a restricted protocol's header from metadata named with this prefix."""


INFER_KEY_RULE = ("24 to 512 characters of A-Z, a-z, 0-9, '.', '_', '~' and '-' on one line (make one with "
                  "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'` or `openssl rand -hex 32`)")
"""What an operator's key must be: long enough to be a secret, and only characters that pass unchanged through
tritonserver's ``--http-restricted-api API:HEADER=KEY`` argument, an HTTP header and gRPC metadata."""
_INFER_KEY = re.compile(r"[A-Za-z0-9._~-]{24,512}")


class InferKeyFileError(ValueError):
    """A key file that cannot be read or holds no usable key. The message names the file, never the key."""


def read_infer_key_file(path: Path) -> str:
    """The inference key in ``path``: a file an operator provides (a mounted Kubernetes Secret, say) or the one
    the launcher writes. Surrounding whitespace (a final newline) is not part of the key."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InferKeyFileError(f"inference key file {path} cannot be read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise InferKeyFileError(f"inference key file {path} is not UTF-8 text; the key must be {INFER_KEY_RULE}") \
            from None
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        # Whoever can write it chooses the key every replica accepts (a mounted Secret is never writable).
        raise InferKeyFileError(f"inference key file {path} (mode {stat.S_IMODE(mode):o}) can be written by others "
                                "than its owner: make it writable by its owner alone (chmod go-w)")
    key = text.strip()
    if not key:
        raise InferKeyFileError(f"inference key file {path} is empty; the key must be {INFER_KEY_RULE}")
    if not _INFER_KEY.fullmatch(key):
        # The key itself is never shown: the file may hold the right secret with one wrong character.
        raise InferKeyFileError(f"inference key file {path} holds {len(key)} characters that are not a usable key: "
                                f"the key must be {INFER_KEY_RULE}")
    return key


def http_key_headers(key: str) -> dict[str, str]:
    """The headers of an HTTP request with ``key``: a new dict each time, since tritonclient.http adds its own
    headers (an int among them) to the dict it is given."""
    return {INFER_KEY_HEADER: key}


def grpc_key_headers(key: str) -> dict[str, str]:
    """The gRPC metadata of a request with ``key``."""
    return {GRPC_HEADER_PREFIX + INFER_KEY_HEADER: key}


class StateDirError(Exception):
    """The state dir cannot be trusted, or describes no server that can be read."""


class UntrustedStateDirError(StateDirError):
    """Someone else could write in the state dir: nothing in it may be believed."""


class NoServerError(StateDirError):
    """No server description in the state dir: no server started, it is still starting, or it has stopped."""


def state_dir_problem(state_dir: Path) -> str | None:
    """Why ``state_dir`` cannot be trusted with a key (None if it can): it must be a directory of this user
    that nobody else can write to."""
    status = state_dir.stat()
    if not stat.S_ISDIR(status.st_mode):
        return f"state dir {state_dir} is not a directory"
    if status.st_uid != os.getuid() or status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"state dir {state_dir} (mode {stat.S_IMODE(status.st_mode):o}) must belong to this user and be "
                "writable by it alone: others could replace server.json or the key; use a private directory")
    return None


@dataclass(frozen=True)
class ServerDescription:
    """What a client needs from the state dir to reach the launcher's server."""

    url: str
    """``http://host:port`` of the HTTP endpoint."""
    grpc_address: str
    """``host:port`` of the gRPC endpoint."""
    models: tuple[str, ...]
    streaming_models: frozenset[str]
    """The decoupled models among :attr:`models`: they answer on gRPC streams only, with progress."""
    infer_key: str

    @property
    def http_address(self) -> str:
        """``host:port``, as tritonclient wants it."""
        return urllib.parse.urlsplit(self.url).netloc


def read_server_description(state_dir: Path) -> ServerDescription:
    """The server the launcher describes in ``state_dir``, with its key; StateDirError if the directory cannot
    be trusted (UntrustedStateDirError), describes no server (NoServerError) or cannot be read."""
    problem = state_dir_problem(state_dir) if state_dir.is_dir() else None
    if problem:
        raise UntrustedStateDirError(problem)
    try:
        description = json.loads((state_dir / SERVER_FILE).read_text(encoding="utf-8"))
        infer_key = (state_dir / INFER_KEY_FILE).read_text(encoding="utf-8").strip()
        if not infer_key:
            raise ValueError(f"{state_dir / INFER_KEY_FILE} is empty")
        return ServerDescription(
            url=str(description["url"]),
            grpc_address=str(description["grpc_address"]),
            models=tuple(description["models"]),
            streaming_models=frozenset(description.get("streaming_models", ())),
            infer_key=infer_key,
        )
    except FileNotFoundError as error:
        # The launcher writes server.json once every model has passed its start-up probe, and removes it on stop.
        raise NoServerError(f"{error.filename} does not exist: no server is serving from {state_dir} "
                            "(still starting, stopped, or another --state-dir)") from error
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise StateDirError(f"cannot read the server description in {state_dir}: {error!r}") from error
