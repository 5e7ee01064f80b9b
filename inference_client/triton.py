"""tritonclient's HTTP and gRPC clients, set up for the text-to-image contract.

- Long timeouts: a generation takes seconds to minutes, and tritonclient's HTTP default (60 s) would cut it off.
- No proxy: the servers are on loopback or a private network, never behind an ``http_proxy`` from the
  environment (which grpcio would otherwise honour).
- The inference key: as the ``infer-key`` header over HTTP, as ``triton-grpc-protocol-infer-key`` metadata over
  gRPC (:mod:`.state`).
- Streaming models (decoupled) answer on a gRPC stream only: :class:`ImageStream` runs one request there,
  yields its progress and image, and cancels it on the server.
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import Iterator
from types import TracebackType
from typing import Any, cast

import numpy as np

from .contract import (
    IMAGE,
    OUTPUT_NAMES,
    PROGRESS_NAMES,
    SEED,
    GeneratedImage,
    Progress,
    TextToImage,
    read_progress,
    read_result,
)
from .state import grpc_key_headers, http_key_headers

PROBE_SIDE = 64
"""Side of the probe's image: a multiple of every family's size multiple, cheap on any device."""
QUEUE_FULL = "Exceeds maximum queue size"
QUEUE_TIMEOUT = "Request timeout expired"
"""Triton's own words when a model's ``default_queue_policy`` refuses a request (HTTP 503): the model is busy,
not broken."""
_SEND_FAILURE_WAIT_S = 10.0
"""How long a stream that could not send its request waits for tritonclient's stream thread to report why."""
_STREAM_SILENCE_MARGIN_S = 30.0
_MAX_GRPC_MESSAGE_BYTES = 2**31 - 1
"""tritonclient's own bound; grpcio's default (4 MiB) is smaller than one 2048x2048 image."""


def http_client(address: str, *, timeout_s: float, ssl: bool = False, concurrency: int = 1) -> Any:
    """A ``tritonclient.http.InferenceServerClient`` for ``host:port``. Not thread-safe: one per thread, or
    ``concurrency`` connections for its async calls."""
    import tritonclient.http

    return tritonclient.http.InferenceServerClient(address, ssl=ssl, connection_timeout=timeout_s,
                                                   network_timeout=timeout_s, concurrency=concurrency)


def grpc_client(address: str) -> Any:
    """A ``tritonclient.grpc.InferenceServerClient`` for ``host:port`` that never goes through a proxy."""
    import tritonclient.grpc

    return tritonclient.grpc.InferenceServerClient(address, channel_args=[
        ("grpc.enable_http_proxy", 0),
        # tritonclient's defaults, which channel_args replaces.
        ("grpc.max_send_message_length", _MAX_GRPC_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", _MAX_GRPC_MESSAGE_BYTES),
    ])


def http_inputs(request: TextToImage) -> list[Any]:
    """``tritonclient.http.InferInput`` objects of ``request``, binary-encoded."""
    import tritonclient.http

    return [_filled(tritonclient.http.InferInput, name, array, binary_data=True)
            for name, array in request.arrays().items()]


def http_outputs() -> list[Any]:
    import tritonclient.http

    return [tritonclient.http.InferRequestedOutput(name, binary_data=True) for name in OUTPUT_NAMES]


def grpc_inputs(request: TextToImage) -> list[Any]:
    """``tritonclient.grpc.InferInput`` objects of ``request``."""
    import tritonclient.grpc

    return [_filled(tritonclient.grpc.InferInput, name, array) for name, array in request.arrays().items()]


def _filled(kind: Any, name: str, array: np.ndarray, **options: Any) -> Any:
    from tritonclient.utils import np_to_triton_dtype

    tensor = kind(name, list(array.shape), "BYTES" if array.dtype == np.object_ else np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array, **options)
    return tensor


IDEMPOTENCY_HEADER = "Idempotency-Key"
"""Sent with every seeded request: it gives the same image however often it runs, so a proxy may send it again
after a replica failed it (the Helm chart's HAProxy retries only requests that carry it). The header and its
meaning follow the IETF's draft-ietf-httpapi-idempotency-key-header; the value is unique per request."""


CLOSE_CONNECTION = {"Connection": "close"}
"""For a client that stays up longer than a server: tritonserver's stop (2.51) waits for every open HTTP
connection, idle ones included, until its exit timeout, and then exits as if requests had been cut. A connection
closed after each response costs a connect per request and never holds a stop up."""


def infer_http(client: Any, model: str, request: TextToImage, key: str, *, keep_alive: bool = True) -> GeneratedImage:
    """One request over HTTP; raises what tritonclient raises (``InferenceServerException``, OSError).
    ``keep_alive=False``: the server closes the connection after the response (:data:`CLOSE_CONNECTION`)."""
    headers = http_key_headers(key) if keep_alive else {**http_key_headers(key), **CLOSE_CONNECTION}
    if request.seed is not None:
        headers[IDEMPOTENCY_HEADER] = uuid.uuid4().hex
    result = client.infer(model, http_inputs(request), outputs=http_outputs(), headers=headers)
    return read_result(result)


class StreamError(Exception):
    """The stream broke, or the server sent something that is neither progress nor an image."""


class StreamCancelledError(Exception):
    """:meth:`ImageStream.cancel` ended the stream: the server stops after the denoising step it is at."""


_CANCEL = object()


class ImageStream:
    """One request on a streaming (decoupled) model, over a gRPC stream of its own::

        with ImageStream(address, model, request, key, timeout_s) as stream:
            for event in stream:   # Progress after every denoising step, then the GeneratedImage
                ...

    :meth:`cancel` (from any thread) has the reading thread cancel the gRPC call as soon as it next looks (at
    once while it waits for the server, after the progress callback it may be in), which Triton passes on to the
    model as the request's cancellation; iterating then raises StreamCancelledError. A server error arrives as
    tritonclient's ``InferenceServerException`` (its ``status()`` is the gRPC code, e.g. ``StatusCode.UNAVAILABLE``,
    for a broken call; None for the model's own error response).
    """

    def __init__(self, address: str, model: str, request: TextToImage, key: str, timeout_s: float) -> None:
        from tritonclient.utils import InferenceServerException

        self._responses: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._client = grpc_client(address)
        self._open = True
        self._silence_limit_s = timeout_s + _STREAM_SILENCE_MARGIN_S
        self._send_failure: Exception | None = None
        try:
            self._client.start_stream(callback=self._receive, stream_timeout=timeout_s,
                                      headers=grpc_key_headers(key))
            # The final response is always heard, so a stream that ends without an image cannot hang the reader.
            self._client.async_stream_infer(model, grpc_inputs(request), enable_empty_final_response=True)
        except InferenceServerException as error:
            # tritonclient refuses to send once its stream thread has seen the call fail (a server that is down,
            # a refused key), with a message that does not say why; that thread's error does, and is on its way.
            self._send_failure = error
        except BaseException:
            self.close()
            raise

    def _receive(self, result: Any, error: Any) -> None:  # tritonclient's stream thread
        self._responses.put((result, error))

    def __enter__(self) -> ImageStream:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def cancel(self) -> None:
        """Cancel the request; safe from any thread, at any time (the reading thread acts on it)."""
        self._responses.put(_CANCEL)

    def close(self, *, cancel: bool = True) -> None:
        """End the stream and close the connection. ``cancel``: cancel the call (and the request, if it still
        runs); without, end it in order, as a request that has had its final response must be: a decoupled model
        whose finished request's call was cancelled can stay "live" at shutdown until Triton's exit timeout
        (seen with tritonserver 2.51)."""
        if self._open:
            self._open = False
            self._client.stop_stream(cancel_requests=cancel)
            self._client.close()

    def __iter__(self) -> Iterator[Progress | GeneratedImage]:
        while True:
            item = self._next()
            if item is _CANCEL:
                self.close()
                raise StreamCancelledError("the request was cancelled")
            result, error = cast("tuple[Any, Any]", item)
            if error is not None:
                raise error
            names = {output.name for output in result.get_response().outputs}
            try:
                if {IMAGE, SEED} <= names:
                    image = read_result(result)
                elif set(PROGRESS_NAMES) <= names:
                    yield read_progress(result)
                    continue
                elif _is_final(result):
                    raise StreamError("the stream ended without an image")
                else:
                    raise StreamError(f"a stream response with outputs {sorted(names)}: neither progress nor an "
                                      "image")
            except (ValueError, IndexError, TypeError) as malformed:  # tensors of the wrong shape or type
                raise StreamError(f"a malformed stream response: {malformed}") from None
            if not _is_final(result):  # the model may say "final" in a response of its own, after the image
                self._read_until_final()
            self.close(cancel=False)
            yield image
            return

    def _read_until_final(self) -> None:
        while True:
            item = self._next()
            if item is _CANCEL:
                return  # the image is here already: nothing is left to cancel
            result, error = cast("tuple[Any, Any]", item)
            if error is not None:
                raise error
            if _is_final(result):
                return

    def _next(self) -> object:
        """The next response, error or cancel. Bounded: should tritonclient's stream thread die without a word,
        the stream's own deadline would never be heard."""
        limit_s = _SEND_FAILURE_WAIT_S if self._send_failure is not None else self._silence_limit_s
        try:
            return self._responses.get(timeout=limit_s)
        except queue.Empty:
            self.close()
            if self._send_failure is not None:
                raise self._send_failure from None
            raise StreamError(f"no word from the stream for {limit_s:.0f} s") from None


def _is_final(result: Any) -> bool:
    parameters = result.get_response().parameters
    return "triton_final_response" in parameters and bool(parameters["triton_final_response"].bool_param)


def probe_inference(http_address: str, grpc_address: str, model: str, key: str, *, streaming: bool,
                    timeout_s: float) -> np.ndarray:
    """The image of one small real inference on ``model`` (a PROBE_SIDE square, one step): over HTTP, or over
    a gRPC stream for a streaming (decoupled) model, which Triton serves no other way. Raises what the client
    raises. The launcher's start-up probe, its watchdog and the health check all use it."""
    request = TextToImage("readiness probe", width=PROBE_SIDE, height=PROBE_SIDE, num_inference_steps=1, seed=0)
    if not streaming:
        with http_client(http_address, timeout_s=timeout_s) as client:
            return infer_http(client, model, request, key).image
    with ImageStream(grpc_address, model, request, key, timeout_s) as stream:
        for event in stream:
            if isinstance(event, GeneratedImage):
                return event.image
    raise StreamError("the stream ended without an image")
