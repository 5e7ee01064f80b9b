"""The exceptions of the server side: one root, one subclass per way a caller must react."""

from __future__ import annotations

from inference_client.contract import describe_value


class DiffusersBackendError(Exception):
    """Root of every error this package raises on purpose."""


class ModelConfigError(DiffusersBackendError):
    """A ``config.pbtxt`` parameter is missing, unknown or out of its range; the model does not load."""


class ModelLoadError(DiffusersBackendError):
    """The pipeline's weights could not be found, fetched or placed; the model does not load."""


class InvalidRequestError(DiffusersBackendError):
    """One request's input breaks a rule; only that request fails (Triton ``INVALID_ARG``).

    The message always names the field, the value received and the rule it broke.
    """

    def __init__(self, field: str, value: object, rule: str) -> None:
        self.field = field
        self.value = value
        self.rule = rule
        if value is MISSING:
            super().__init__(f"{field} is missing: {rule}")
        else:
            super().__init__(f"{field}={describe_value(value)} is invalid: {rule}")


class Shown(str):
    """A description of a received value that is shown as is, unquoted (e.g. ``<INT64 tensor>``)."""

    def __repr__(self) -> str:
        return str(self)


MISSING = Shown("<missing>")


class GenerationError(DiffusersBackendError):
    """The pipeline failed on valid input (out of memory, non-finite pixels); that group of requests fails."""


class RequestCancelledError(DiffusersBackendError):
    """The caller cancelled the request (Triton saw its gRPC call cancelled): no more is computed for it."""
