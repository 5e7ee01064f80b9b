"""Triton's gRPC inference API spoken with grpcio alone: the streaming (decoupled) models need it.

tritonclient's gRPC client needs protobuf<5, which the pipelines' protobuf pin rules out, and generated stubs
would need Triton's .proto files. The messages involved are few and flat, so this module writes and reads
them itself, by protobuf's wire format (field numbers from Triton's grpc_service.proto):

- ModelInferRequest: model_name = 1, id = 3, inputs = 5 (InferInputTensor: name = 1, datatype = 2,
  shape = 3), raw_input_contents = 7;
- ModelStreamInferResponse: error_message = 1, infer_response = 2 (ModelInferResponse: id = 3,
  outputs = 5 (InferOutputTensor: name = 1, datatype = 2, shape = 3), raw_output_contents = 6).

Restricted-protocol headers travel as metadata named ``triton-grpc-protocol-<header>``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

SERVICE = "/inference.GRPCInferenceService/"
METADATA_PREFIX = "triton-grpc-protocol-"
"""Triton's gRPC endpoint reads a restricted protocol's header from metadata named with this prefix."""

_DATATYPE_OF_DTYPE: dict[np.dtype[Any], str] = {
    np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32", np.dtype(np.uint8): "UINT8",
}
_DTYPE_OF_DATATYPE: dict[str, np.dtype[Any]] = {name: dtype for dtype, name in _DATATYPE_OF_DTYPE.items()}
_VARINT, _LENGTH_DELIMITED = 0, 2


def varint(value: int) -> bytes:
    if value < 0:  # int64 fields carry negatives as their two's complement, in ten bytes
        value += 1 << 64
    encoded = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        encoded.append(low | (0x80 if value else 0))
        if not value:
            return bytes(encoded)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (strings, bytes, messages, packed numbers)."""
    return varint(number << 3 | _LENGTH_DELIMITED) + varint(len(payload)) + payload


def fields(message: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of every field of ``message``: an int for varints, bytes for the rest."""
    position = 0
    while position < len(message):
        key, position = _read_varint(message, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, position = _read_varint(message, position)
            yield number, value
        elif wire_type == _LENGTH_DELIMITED:
            length, position = _read_varint(message, position)
            yield number, message[position:position + length]
            position += length
        elif wire_type in (1, 5):  # 64- and 32-bit fixed: none in the messages we read, but skip them right
            size = 8 if wire_type == 1 else 4
            yield number, message[position:position + size]
            position += size
        else:
            raise ValueError(f"protobuf wire type {wire_type} at byte {position} is not supported")


def _read_varint(message: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = message[position]
        value, shift, position = value | (byte & 0x7F) << shift, shift + 7, position + 1
        if not byte & 0x80:
            return value, position


def infer_request(model: str, arrays: Mapping[str, np.ndarray], request_id: str = "") -> bytes:
    """A ModelInferRequest for ``model`` with ``arrays`` as raw inputs (object arrays are BYTES tensors)."""
    request = field(1, model.encode())
    if request_id:
        request += field(3, request_id.encode())
    contents = []
    for name, array in arrays.items():
        if array.dtype == np.object_:
            datatype = "BYTES"
            raw = b"".join(struct.pack("<I", len(item)) + item for item in array.reshape(-1))
        else:
            datatype = _DATATYPE_OF_DTYPE[array.dtype]
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        shape = b"".join(varint(dimension) for dimension in array.shape)
        request += field(5, field(1, name.encode()) + field(2, datatype.encode()) + field(3, shape))
        contents.append(raw)
    return request + b"".join(field(7, raw) for raw in contents)


@dataclass(frozen=True)
class StreamResponse:
    """One ModelStreamInferResponse: an error, or output arrays."""

    error: str
    outputs: dict[str, np.ndarray]
    request_id: str = ""


def stream_response(message: bytes) -> StreamResponse:
    error, infer_response = "", b""
    for number, value in fields(message):
        if number == 1 and isinstance(value, bytes):
            error = value.decode(errors="replace")
        elif number == 2 and isinstance(value, bytes):
            infer_response = value
    request_id, specs, contents = "", [], []
    for number, value in fields(infer_response):
        if not isinstance(value, bytes):
            continue
        if number == 3:
            request_id = value.decode(errors="replace")
        elif number == 5:
            specs.append(_output_spec(value))
        elif number == 6:
            contents.append(value)
    if len(contents) != len(specs):
        raise ValueError(f"a response with {len(specs)} outputs carries {len(contents)} raw contents")
    outputs = {name: _array(datatype, shape, raw) for (name, datatype, shape), raw in zip(specs, contents,
                                                                                        strict=True)}
    return StreamResponse(error=error, outputs=outputs, request_id=request_id)


def _output_spec(message: bytes) -> tuple[str, str, list[int]]:
    name = datatype = ""
    shape: list[int] = []
    for number, value in fields(message):
        if number == 1 and isinstance(value, bytes):
            name = value.decode()
        elif number == 2 and isinstance(value, bytes):
            datatype = value.decode()
        elif number == 3:  # packed (bytes) or, from some encoders, one varint per dimension
            shape += _packed_varints(value) if isinstance(value, bytes) else [value]
    return name, datatype, shape


def _packed_varints(packed: bytes) -> list[int]:
    values, position = [], 0
    while position < len(packed):
        value, position = _read_varint(packed, position)
        values.append(value)
    return values


def _array(datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    if datatype not in _DTYPE_OF_DATATYPE:
        raise ValueError(f"output datatype {datatype} is not one a text-to-image model sends")
    return np.frombuffer(raw, dtype=_DTYPE_OF_DATATYPE[datatype].newbyteorder("<")).reshape(shape)


def channel(address: str) -> Any:
    """A grpcio channel to ``host:port`` that never goes through a proxy from the environment."""
    import grpc

    return grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)])


def metadata(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Restricted-protocol headers as Triton's gRPC endpoint wants them."""
    return tuple((METADATA_PREFIX + name, value) for name, value in headers.items())


def stream_infer(open_channel: Any, request: bytes, headers: Mapping[str, str], timeout_s: float) -> Any:
    """Send one request on a ModelStreamInfer stream; the call: iterate it for the raw responses, ``cancel()``
    it to cancel the request on the server."""
    method = open_channel.stream_stream(SERVICE + "ModelStreamInfer")  # no serializers: bytes in, bytes out
    return method(iter((request,)), metadata=metadata(headers), timeout=timeout_s)
