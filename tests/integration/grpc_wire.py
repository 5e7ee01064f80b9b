"""Triton's gRPC API spoken with grpcio alone, for the tests.

tritonclient's gRPC client needs protobuf<5, which the pipelines' pin rules out. This holds just enough of
protobuf's wire format (varints and length-delimited fields) to build a ModelInferRequest of Triton's
grpc_service.proto and to read the raw outputs of its answer.
"""

from __future__ import annotations

import struct
from typing import Any

from triton_launcher.paths import INFER_KEY_HEADER
from triton_launcher.server import TritonServer

GRPC_SERVICE = "/inference.GRPCInferenceService/"
KEY_METADATA = f"triton-grpc-protocol-{INFER_KEY_HEADER}"
"""Triton's gRPC endpoint reads a restricted protocol's header from metadata named with this prefix."""


def varint(value: int) -> bytes:
    encoded = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        encoded.append(low | (0x80 if value else 0))
        if not value:
            return bytes(encoded)


def field(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def length_delimited_fields(message: bytes) -> list[tuple[int, bytes]]:
    fields, position = [], 0
    while position < len(message):
        key, position = _read_varint(message, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, position = _read_varint(message, position)
        elif wire_type == 2:
            length, position = _read_varint(message, position)
            fields.append((number, message[position:position + length]))
            position += length
        else:
            raise AssertionError(f"wire type {wire_type} is not in a ModelInferResponse")
    return fields


def _read_varint(message: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = message[position]
        value, shift, position = value | (byte & 0x7F) << shift, shift + 7, position + 1
        if not byte & 0x80:
            return value, position


def model_infer_request(model: str, side: int, steps: int = 1) -> bytes:
    """ModelInferRequest: model_name (1), inputs (5: name 1, datatype 2, shape 3) and raw_input_contents (7)."""
    prompt = b"a red cube"
    inputs = [("PROMPT", "BYTES", struct.pack("<I", len(prompt)) + prompt),
              ("WIDTH", "INT32", struct.pack("<i", side)), ("HEIGHT", "INT32", struct.pack("<i", side)),
              ("NUM_INFERENCE_STEPS", "INT32", struct.pack("<i", steps))]
    shape = varint(1) + varint(1)
    request = field(1, model.encode())
    for name, datatype, _ in inputs:
        request += field(5, field(1, name.encode()) + field(2, datatype.encode()) + field(3, shape))
    return request + b"".join(field(7, contents) for _, _, contents in inputs)


def channel(server: TritonServer) -> Any:
    import grpc

    # No proxy: a grpc_proxy or http_proxy in the environment must not carry loopback calls elsewhere.
    return grpc.insecure_channel(f"127.0.0.1:{server.options.grpc_port}", options=[("grpc.enable_http_proxy", 0)])


def method(open_channel: Any, name: str) -> Any:
    return open_channel.unary_unary(GRPC_SERVICE + name)  # no serializers: bytes in, bytes out


def key_metadata(key: str | None) -> tuple[tuple[str, str], ...] | None:
    return None if key is None else ((KEY_METADATA, key),)


def grpc_call(server: TritonServer, name: str, request: bytes, key: str | None) -> bytes:
    with channel(server) as open_channel:
        return bytes(method(open_channel, name)(request, metadata=key_metadata(key), timeout=120))
