"""Raw gRPC calls for the tests, on top of triton_launcher.grpc_wire (grpcio and our own protobuf codec)."""

from __future__ import annotations

from typing import Any

from triton_launcher import contract
from triton_launcher.grpc_wire import SERVICE, field, fields, infer_request
from triton_launcher.grpc_wire import channel as open_channel
from triton_launcher.grpc_wire import metadata as grpc_metadata
from triton_launcher.paths import INFER_KEY_HEADER
from triton_launcher.server import TritonServer

__all__ = ["channel", "field", "grpc_call", "key_metadata", "length_delimited_fields", "method",
           "model_infer_request"]


def length_delimited_fields(message: bytes) -> list[tuple[int, bytes]]:
    return [(number, value) for number, value in fields(message) if isinstance(value, bytes)]


def model_infer_request(model: str, side: int, steps: int = 1) -> bytes:
    request = contract.TextToImage("a red cube", width=side, height=side, num_inference_steps=steps)
    return infer_request(model, request.arrays())


def channel(server: TritonServer) -> Any:
    return open_channel(f"127.0.0.1:{server.options.grpc_port}")


def method(opened: Any, name: str) -> Any:
    return opened.unary_unary(SERVICE + name)  # no serializers: bytes in, bytes out


def key_metadata(key: str | None) -> tuple[tuple[str, str], ...] | None:
    return None if key is None else grpc_metadata({INFER_KEY_HEADER: key})


def grpc_call(server: TritonServer, name: str, request: bytes, key: str | None) -> bytes:
    with channel(server) as opened:
        return bytes(method(opened, name)(request, metadata=key_metadata(key), timeout=120))
