"""Errors as HTTP answers: one stable ``code`` per error class, the status it deserves, the layer's own message.

Every answer is ``{"status": …, "code": …, "message": …}`` (and ``option`` for an invalid option); the table in
docs/service.md is the contract, and clients switch on ``code``, never on the message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

from capability.errors import (
    CapabilityError,
    ConcurrencyLimitError,
    DeniedError,
    GenerationCancelledError,
    GenerationError,
    InvalidOptionError,
    InvalidParamsError,
    ModelNotServedError,
    RequestRefusedError,
    ServerBusyError,
    ServerUnavailableError,
    StoreError,
    UnauthenticatedError,
    UnknownCapabilityError,
    UnknownServerError,
    describe_option_name,
)


@dataclass(frozen=True)
class ErrorClass:
    status: int
    code: str
    retry_after_s: int | None = None


# Most specific first: UnknownCapabilityError and ConcurrencyLimitError are DeniedErrors, ModelNotServedError and
# the unavailable ones are ServerErrors.
ERROR_CLASSES: tuple[tuple[type[CapabilityError], ErrorClass], ...] = (
    (UnknownCapabilityError, ErrorClass(404, "unknown_capability")),
    # A slot frees when a generation ends: seconds on a GPU, so a second is a fair first wait.
    (ConcurrencyLimitError, ErrorClass(429, "concurrency_limit", retry_after_s=1)),
    (DeniedError, ErrorClass(403, "denied")),
    (InvalidOptionError, ErrorClass(400, "invalid_option")),
    (InvalidParamsError, ErrorClass(400, "invalid_params")),
    (UnauthenticatedError, ErrorClass(401, "unauthenticated")),
    (ModelNotServedError, ErrorClass(400, "model_not_served")),
    (RequestRefusedError, ErrorClass(400, "refused_by_model")),
    (UnknownServerError, ErrorClass(500, "server_not_registered")),
    (ServerBusyError, ErrorClass(503, "server_busy", retry_after_s=1)),
    # A restart reloads every model; the layer has already retried seeded requests for a while.
    (ServerUnavailableError, ErrorClass(503, "server_unavailable", retry_after_s=5)),
    (GenerationError, ErrorClass(502, "generation_failed")),
    (GenerationCancelledError, ErrorClass(409, "cancelled")),
    (StoreError, ErrorClass(503, "store_unavailable", retry_after_s=1)),
)
INTERNAL = ErrorClass(500, "internal")


def classify(error: CapabilityError) -> ErrorClass:
    for error_type, error_class in ERROR_CLASSES:
        if isinstance(error, error_type):
            return error_class
    return INTERNAL


def error_body(error: CapabilityError, *, with_retry_after: bool = False) -> dict[str, Any]:
    """The error's JSON; ``with_retry_after``: with ``retryAfterS`` too, where an event stream has no header."""
    error_class = classify(error)
    body: dict[str, Any] = {"status": error_class.status, "code": error_class.code, "message": str(error)}
    if isinstance(error, InvalidOptionError):
        body["option"] = describe_option_name(error.option)
    if with_retry_after and error_class.retry_after_s is not None:
        body["retryAfterS"] = error_class.retry_after_s
    return body


def error_response(error: CapabilityError) -> JSONResponse:
    """The error as a JSON answer, its Retry-After (where it has one) as a header."""
    body = error_body(error)
    status, code, message = body.pop("status"), body.pop("code"), body.pop("message")
    return problem(status, code, message, retry_after_s=classify(error).retry_after_s, extra=body)


def problem(status: int, code: str, message: str, *, retry_after_s: int | None = None,
            extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error answer of the service's one shape."""
    all_headers = dict(headers or {})
    if retry_after_s is not None:
        all_headers["Retry-After"] = str(retry_after_s)
    if status == 401:
        all_headers.setdefault("WWW-Authenticate", 'Bearer realm="capability"')
    return JSONResponse({"status": status, "code": code, "message": message, **(extra or {})}, status_code=status,
                        headers=all_headers)
