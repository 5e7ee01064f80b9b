"""Streaming to a server that is not there: the caller hears why (UNAVAILABLE: retry), never a generic error.

tritonclient refuses to send on a stream whose call has already failed, with a message that does not say why,
while the reason travels to its stream thread's callback; which of the two comes first is a race (it lost about
three times in four on these machines). Each case is tried many times so that the losing order is met too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from capability.errors import GenerationCancelledError, TemporarilyUnavailableError
from capability.servers import Cancellation, ServerKeys, TritonGateway
from capability.sqlite_store import SQLiteStore
from capability.store import STORE_FILE
from inference_client import contract, triton
from triton_launcher.server import free_ports

TRIES = 20
REQUEST = contract.TextToImage("a red cube", width=64, height=64, num_inference_steps=1)


@pytest.fixture
def nothing_listening() -> tuple[int, int]:
    """An HTTP and a gRPC port on loopback where nothing listens (free now)."""
    http_port, grpc_port = free_ports(2)
    return http_port, grpc_port


def test_a_stream_to_a_port_where_nothing_listens_says_unavailable(nothing_listening: tuple[int, int]) -> None:
    _, grpc_port = nothing_listening
    for _ in range(TRIES):
        with triton.ImageStream(f"127.0.0.1:{grpc_port}", "tiny-sd15", REQUEST, "key", timeout_s=30) as stream, \
                pytest.raises(InferenceServerException) as caught:
            list(stream)
        assert caught.value.status() == "StatusCode.UNAVAILABLE", caught.value


def test_the_capability_layer_reports_a_down_server_as_temporarily_unavailable_so_seeded_requests_retry(
    tmp_path: Path, nothing_listening: tuple[int, int],
) -> None:
    http_port, grpc_port = nothing_listening
    keys = ServerKeys(SQLiteStore(tmp_path / STORE_FILE), state_dir=None)
    (tmp_path / "key").write_text("a-key-of-at-least-24-characters\n")
    url = keys.register(f"http://127.0.0.1:{http_port}", tmp_path / "key", f"127.0.0.1:{grpc_port}")
    gateway = TritonGateway(url, keys)
    for _ in range(TRIES):
        with pytest.raises(TemporarilyUnavailableError, match="temporarily unavailable"):
            gateway.generate_streaming("tiny-sd15", REQUEST, on_progress=None, cancellation=None)
    cancelled = Cancellation()
    cancelled.cancel()  # before the stream opens: it is cancelled as soon as it does
    with pytest.raises(GenerationCancelledError, match="cancelled by the caller"):
        gateway.generate_streaming("tiny-sd15", REQUEST, on_progress=None, cancellation=cancelled)


@pytest.mark.parametrize(("status", "temporary"), [("502", True), ("504", True), ("503", True), ("500", False)])
def test_a_proxy_that_got_no_answer_from_a_replica_is_temporarily_unavailable(
    tmp_path: Path, status: str, temporary: bool,
) -> None:
    """502 and 504 come only from a proxy in front of the replicas (one died mid-answer, or did not answer in
    time): seeded requests are worth retrying. Any other failure of the server is the request's own."""
    from capability.errors import GenerationError

    keys = ServerKeys(SQLiteStore(tmp_path / STORE_FILE), state_dir=None)
    (tmp_path / "key").write_text("a-key-of-at-least-24-characters\n")
    gateway = TritonGateway(keys.register("http://127.0.0.1:9", tmp_path / "key"), keys)

    def fails(_client: object, _key: str) -> None:
        raise InferenceServerException(msg="<html><body><h1>Bad Gateway</h1></body></html>", status=status)

    expected = TemporarilyUnavailableError if temporary else GenerationError
    with pytest.raises(expected) as raised:
        gateway._call(fails)
    assert type(raised.value) is expected
