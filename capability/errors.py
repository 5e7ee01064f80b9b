"""The capability layer's exceptions: one root, and a subclass for each way a caller must react.

Every message says what was refused and why, naming the capability, option or value involved; none of them
contains a prompt in full or a key.
"""

from __future__ import annotations

from inference_client.contract import describe_value


class CapabilityError(Exception):
    """Root of every error this package raises on purpose."""


class StoreError(CapabilityError):
    """The capability store cannot be opened, migrated or written."""


class DeniedError(CapabilityError):
    """The acting entity may not do this with this capability (not its owner, revoked, expired, beyond a limit)."""


class UnknownCapabilityError(DeniedError):
    """No such capability, or not the acting entity's (nor below one it holds): one answer for both, so that
    capability ids cannot be probed for."""


class UnauthenticatedError(CapabilityError):
    """The HTTP service cannot tell who is calling: no bearer token, or one that is malformed, unknown, revoked
    or expired (the message never contains the token)."""


class ConcurrencyLimitError(DeniedError):
    """``max_concurrent`` generations are already running under this capability or one of its ancestors."""


class InvalidParamsError(CapabilityError):
    """Parameters given to mint or delegate are malformed, unknown, or wider than the parent allows."""


class InvalidOptionError(CapabilityError):
    """A ``textToImage`` option (or the prompt) breaks a rule; nothing was sent to the server."""

    def __init__(self, option: str, value: object, rule: str) -> None:
        self.option = option
        self.value = value
        self.rule = rule
        super().__init__(f"{describe_option_name(option)}={describe_value(value)} is invalid: {rule}")


def describe_option_name(option: str) -> str:
    """An option's name as a message shows it: as is when it is a short identifier (every real option is), else
    quoted and cut like a value. The name of an unknown option is the caller's key, which may be megabytes long
    or hold lone surrogates and control characters; shown raw, it would bloat the message and the audit record
    made from it, and a lone surrogate would make SQLite refuse that record."""
    if option.isidentifier() and len(option) <= MAX_SHOWN_OPTION_NAME:
        return option
    return describe_value(option)


MAX_SHOWN_OPTION_NAME = 64


class ServerError(CapabilityError):
    """Root of the errors that come from (or about) the Triton server."""


class UnknownServerError(ServerError):
    """No inference key is known for the capability's ``server_url``: the layer never sends a key elsewhere."""


class ServerUnavailableError(ServerError):
    """The server cannot be reached, or refused the key (restarted with a new one and not re-registered)."""


class TemporarilyUnavailableError(ServerUnavailableError):
    """The server is down or restarting (a model's stub crashed, or the server did; the launcher's watchdog
    brings it back): nothing was generated. Requests with a seed are retried by the layer for a while first."""


class ServerBusyError(ServerError):
    """The model's queue on the server is full, or the request waited there past the queue's timeout: nothing
    was generated; retry later (the server refuses at once rather than queueing without bound)."""


class GenerationCancelledError(CapabilityError):
    """The caller cancelled the generation (``Generation.cancel()``, Ctrl-C in the CLI): no image."""


class ModelNotServedError(ServerError):
    """No Triton model on the server serves the requested model id."""


class GenerationError(ServerError):
    """The server refused or failed the generation; the message is the server's."""


class RequestRefusedError(GenerationError):
    """The model refused the request as invalid for it (one of its own rules: SD3 and FLUX sizes are multiples of
    16, a model's step limit): nothing was generated; the message names the option, the value and the rule."""

