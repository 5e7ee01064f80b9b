"""inference_client.triton's HTTP request as a proxy sees it (no server: a client that records what it is given)."""

from __future__ import annotations

from typing import Any

import numpy as np

from inference_client import contract, triton
from inference_client.state import INFER_KEY_HEADER


class RecordingClient:
    """Stands in for tritonclient.http.InferenceServerClient: keeps the headers, answers one 8x8 image."""

    def __init__(self) -> None:
        self.headers: list[dict[str, Any]] = []

    def infer(self, model: str, inputs: list[Any], outputs: list[Any], headers: dict[str, Any]) -> Any:
        self.headers.append(dict(headers))
        arrays = {contract.IMAGE: np.zeros((1, 8, 8, 3), np.uint8), contract.SEED: np.array([[7]], np.int64)}
        return type("Result", (), {"as_numpy": staticmethod(arrays.__getitem__)})()


def test_only_seeded_requests_say_they_may_be_repeated_each_with_a_key_of_its_own() -> None:
    client = RecordingClient()
    seeded = contract.TextToImage("a red cube", seed=7)
    triton.infer_http(client, "tiny-sd15", seeded, "the-inference-key-of-24-chars")
    triton.infer_http(client, "tiny-sd15", seeded, "the-inference-key-of-24-chars")
    triton.infer_http(client, "tiny-sd15", contract.TextToImage("a red cube"), "the-inference-key-of-24-chars")
    first, second, unseeded = client.headers
    assert first[INFER_KEY_HEADER] == "the-inference-key-of-24-chars"
    assert len(first[triton.IDEMPOTENCY_HEADER]) == 32
    assert first[triton.IDEMPOTENCY_HEADER] != second[triton.IDEMPOTENCY_HEADER]
    assert triton.IDEMPOTENCY_HEADER not in unseeded
    assert unseeded == {INFER_KEY_HEADER: "the-inference-key-of-24-chars"}
