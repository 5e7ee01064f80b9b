"""Our protobuf codec for Triton's gRPC messages: what it writes reads back, what Triton sends is read right."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from triton_launcher import contract
from triton_launcher.grpc_wire import field, fields, infer_request, metadata, stream_response, varint


def test_varints_round_trip_including_negative_int64() -> None:
    for value in (0, 1, 127, 128, 300, 2**35, 2**63 - 1, -1):
        encoded = varint(1 << 3) + varint(value)  # field 1, wire type 0
        [(number, decoded)] = list(fields(encoded))
        assert number == 1
        assert decoded == (value if value >= 0 else value + (1 << 64))


def test_an_infer_request_carries_the_model_the_inputs_and_their_raw_contents_in_order() -> None:
    arrays = contract.TextToImage("a red cube", width=64, height=48, num_inference_steps=3, seed=7).arrays()
    request = list(fields(infer_request("tiny-sd15", arrays, request_id="r1")))
    assert request[0] == (1, b"tiny-sd15")
    assert request[1] == (3, b"r1")
    inputs = [dict(fields(payload)) for number, payload in request if number == 5]  # type: ignore[arg-type]
    raw = [payload for number, payload in request if number == 7]
    assert [spec[1] for spec in inputs] == [name.encode() for name in arrays]
    assert [spec[2] for spec in inputs] == [b"BYTES", b"INT32", b"INT32", b"INT32", b"INT64"]
    assert all(spec[3] == b"\x01\x01" for spec in inputs)  # shape [1, 1], packed
    assert raw[0] == struct.pack("<I", 10) + b"a red cube"
    assert raw[1:] == [struct.pack("<i", 64), struct.pack("<i", 48), struct.pack("<i", 3), struct.pack("<q", 7)]


def response(outputs: list[tuple[str, str, list[int], bytes]], error: str = "") -> bytes:
    """A ModelStreamInferResponse as Triton writes it."""
    infer = field(3, b"r1")
    for name, datatype, shape, _ in outputs:
        infer += field(5, field(1, name.encode()) + field(2, datatype.encode())
                       + field(3, b"".join(varint(dimension) for dimension in shape)))
    infer += b"".join(field(6, raw) for *_, raw in outputs)
    return (field(1, error.encode()) if error else b"") + field(2, infer)


def test_a_stream_response_gives_its_outputs_as_arrays_of_their_shape_and_type() -> None:
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(1, 2, 3, 3)
    decoded = stream_response(response([
        ("IMAGE", "UINT8", [1, 2, 3, 3], image.tobytes()),
        ("SEED", "INT64", [1, 1], struct.pack("<q", 2**53)),
        ("ELAPSED_S", "FP32", [1, 1], struct.pack("<f", 1.5)),
    ]))
    assert decoded.error == ""
    assert decoded.request_id == "r1"
    np.testing.assert_array_equal(decoded.outputs["IMAGE"], image)
    assert int(decoded.outputs["SEED"][0, 0]) == 2**53
    assert float(decoded.outputs["ELAPSED_S"][0, 0]) == 1.5


def test_a_stream_error_is_read_and_a_malformed_response_is_refused() -> None:
    assert stream_response(response([], error="[request id: r1] WIDTH=7 is invalid")).error.endswith("invalid")
    with pytest.raises(ValueError, match="1 outputs carries 0 raw contents"):
        stream_response(field(2, field(5, field(1, b"IMAGE") + field(2, b"UINT8"))))
    with pytest.raises(ValueError, match="datatype BF16"):
        stream_response(response([("X", "BF16", [1], b"\x00\x00")]))


def test_headers_become_triton_grpc_protocol_metadata() -> None:
    assert metadata({"infer-key": "k"}) == (("triton-grpc-protocol-infer-key", "k"),)
