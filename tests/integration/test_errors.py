"""Bad input and locked-down access through the real tritonserver: clear refusals, and the model keeps serving."""

from __future__ import annotations

import ipaddress
from typing import Any

import numpy as np
import pytest
from tritonclient.http import InferInput
from tritonclient.utils import InferenceServerException

from inference_client import contract, triton
from inference_client.state import INFER_KEY_HEADER, grpc_key_headers
from triton_launcher.server import TritonServer

from .conftest import TINY_MODELS, Generator

BAD_OPTIONS: list[tuple[dict[str, Any], str, str]] = [
    ({"prompt": ""}, "PROMPT", "must contain visible text"),
    ({"prompt": "a", "width": 100}, "WIDTH", "positive multiple of"),
    ({"prompt": "a", "width": 0}, "WIDTH", "positive multiple of"),
    ({"prompt": "a", "height": -16}, "HEIGHT", "positive multiple of"),
    ({"prompt": "a", "width": 4096}, "WIDTH", "at most"),
    ({"prompt": "a", "num_inference_steps": 0}, "NUM_INFERENCE_STEPS", "between 1 and"),
    ({"prompt": "a", "num_inference_steps": 1000}, "NUM_INFERENCE_STEPS", "between 1 and"),
    ({"prompt": "a", "guidance_scale": float("nan")}, "GUIDANCE_SCALE", "finite"),
    ({"prompt": "a", "guidance_scale": float("inf")}, "GUIDANCE_SCALE", "finite"),
    ({"prompt": "a", "guidance_scale": -1.0}, "GUIDANCE_SCALE", "between 0 and"),
    ({"prompt": "a", "seed": -5}, "SEED", "between 0 and"),
]


def assert_invalid_argument(error: InferenceServerException, *fragments: str) -> None:
    # tritonclient's HTTP client reports INVALID_ARG as HTTP 400.
    assert error.status() == "400", (error.status(), error.message())
    for fragment in fragments:
        assert fragment in error.message(), error.message()


def raw_input(name: str, array: np.ndarray, datatype: str) -> InferInput:
    tensor = InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=True)
    return tensor


@pytest.mark.parametrize("model", TINY_MODELS)
@pytest.mark.parametrize(("options", "field", "rule"), BAD_OPTIONS, ids=[f"{f}-{r}" for _, f, r in BAD_OPTIONS])
def test_bad_option_fails_alone_with_invalid_arg_when_sent(
    generator: Generator, model: str, options: dict[str, Any], field: str, rule: str
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        generator.infer(model, contract.TextToImage(**options))
    assert_invalid_argument(caught.value, f"{field}=", rule)
    assert generator.generate(model, num_inference_steps=1).image.shape == (96, 128, 3)


@pytest.mark.parametrize("model", TINY_MODELS)
def test_non_utf8_prompt_fails_with_invalid_arg_when_sent(generator: Generator, model: str) -> None:
    inputs = [raw_input("PROMPT", np.array([[b"caf\xe9 \xff"]], dtype=np.object_), "BYTES")]
    with pytest.raises(InferenceServerException) as caught:
        generator.client.infer(model, inputs, headers=generator.server.headers)
    assert_invalid_argument(caught.value, "PROMPT=", "valid UTF-8")
    assert generator.generate(model, num_inference_steps=1).image.shape == (96, 128, 3)


@pytest.mark.parametrize("model", TINY_MODELS)
def test_missing_prompt_fails_with_invalid_arg_naming_prompt_when_only_options_are_sent(
    generator: Generator, model: str
) -> None:
    inputs = [raw_input("WIDTH", np.array([[64]], dtype=np.int32), "INT32")]
    with pytest.raises(InferenceServerException) as caught:
        generator.client.infer(model, inputs, headers=generator.server.headers)
    assert_invalid_argument(caught.value, "PROMPT")


@pytest.mark.parametrize("model", TINY_MODELS)
@pytest.mark.parametrize(
    ("array", "datatype"),
    [(np.array([[64]], dtype=np.int64), "INT64"), (np.array([[64, 64]], dtype=np.int32), "INT32")],
    ids=["wrong-type", "wrong-shape"],
)
def test_wrongly_typed_or_shaped_tensor_fails_with_invalid_arg_naming_it_when_sent(
    generator: Generator, model: str, array: np.ndarray, datatype: str
) -> None:
    inputs = [*triton.http_inputs(contract.TextToImage("a")), raw_input("WIDTH", array, datatype)]
    with pytest.raises(InferenceServerException) as caught:
        generator.client.infer(model, inputs, headers=generator.server.headers)
    assert_invalid_argument(caught.value, "WIDTH")


def test_negative_prompt_fails_with_invalid_arg_when_flux_has_no_true_cfg(generator: Generator) -> None:
    with pytest.raises(InferenceServerException) as caught:
        generator.infer("tiny-flux", contract.TextToImage("a", negative_prompt="blurry"))
    assert_invalid_argument(caught.value, "NEGATIVE_PROMPT=", "true_cfg_scale")


def test_guidance_fails_with_invalid_arg_when_flux_is_guidance_distilled(generator: Generator) -> None:
    with pytest.raises(InferenceServerException) as caught:
        generator.infer("tiny-flux", contract.TextToImage("a", guidance_scale=3.5))
    assert_invalid_argument(caught.value, "GUIDANCE_SCALE=3.5", "ignores guidance")


@pytest.mark.parametrize("headers", [{}, {"infer-key": "not-the-key"}], ids=["no-key", "wrong-key"])
def test_inference_is_refused_with_403_when_the_infer_key_is_missing_or_wrong(
    generator: Generator, headers: dict[str, str]
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        generator.infer("tiny-sd15", contract.TextToImage("a", num_inference_steps=1), headers=headers)
    assert caught.value.status() == "403"
    assert "infer-key" in caught.value.message()


def test_health_and_metadata_stay_open_when_no_key_is_sent(tiny_server: TritonServer) -> None:
    with tiny_server.http_client() as client:
        assert client.is_server_ready()
        assert all(client.is_model_ready(model) for model in TINY_MODELS)
        assert client.get_model_metadata("tiny-sd15")["name"] == "tiny-sd15"


@pytest.mark.parametrize(
    "call",
    [
        lambda client: client.get_model_config("tiny-sd15"),
        lambda client: client.get_inference_statistics("tiny-sd15"),
        lambda client: client.get_model_repository_index(),
        lambda client: client.update_log_settings({"log_verbose_level": 1}),
        lambda client: client.get_system_shared_memory_status(),
    ],
    ids=["model-config", "statistics", "model-repository", "logging", "shared-memory"],
)
def test_other_apis_are_refused_with_403_when_no_key_is_sent(tiny_server: TritonServer, call: Any) -> None:
    with tiny_server.http_client() as client, pytest.raises(InferenceServerException) as caught:
        call(client)
    assert caught.value.status() == "403"
    with tiny_server.http_client() as client:
        assert client.get_model_config("tiny-sd15", headers=tiny_server.headers)["name"] == "tiny-sd15"


def test_every_listener_of_the_server_is_on_loopback_when_serving(tiny_server: TritonServer) -> None:
    import psutil

    assert tiny_server.process is not None
    server = psutil.Process(tiny_server.process.pid)
    listening = [connection for process in (server, *server.children(recursive=True))
                 for connection in process.net_connections(kind="inet") if connection.status == psutil.CONN_LISTEN]
    # gRPC listens on the IPv4-mapped IPv6 form of 127.0.0.1 (::ffff:127.0.0.1): loopback all the same.
    addresses = {ipaddress.ip_address(connection.laddr.ip) for connection in listening}
    assert {getattr(address, "ipv4_mapped", None) or address for address in addresses} == {
        ipaddress.ip_address("127.0.0.1")}
    ports = {connection.laddr.port for connection in listening}
    assert tiny_server.options.http_port in ports
    assert {tiny_server.options.grpc_port, tiny_server.options.metrics_port} <= ports


@pytest.mark.parametrize("action", ["load_model", "unload_model"])
def test_model_load_and_unload_are_refused_even_with_the_key_when_requested(
    tiny_server: TritonServer, action: str
) -> None:
    with tiny_server.http_client() as client:
        with pytest.raises(InferenceServerException, match="explicit model load / unload is not allowed"):
            getattr(client, action)("tiny-sd15", headers=tiny_server.headers)
        assert client.is_model_ready("tiny-sd15")


def test_grpc_inference_needs_the_key_like_http_and_works_with_it(tiny_server: TritonServer) -> None:
    request = triton.grpc_inputs(contract.TextToImage("a red cube", width=64, height=64, num_inference_steps=1))
    with _grpc_client(tiny_server) as client:
        assert client.is_server_live()  # health is open
        for headers in (None, grpc_key_headers("not-the-key")):
            with pytest.raises(InferenceServerException) as caught:
                client.infer("tiny-sd15", request, headers=headers)
            assert INFER_KEY_HEADER in caught.value.message()

        result = client.infer("tiny-sd15", request, headers=grpc_key_headers(tiny_server.infer_key))
    image = contract.read_result(result)
    assert image.image.shape == (64, 64, 3)
    assert image.image.dtype == np.uint8


@pytest.mark.parametrize(
    ("call", "arguments"),
    [("get_model_config", ("tiny-sd15",)), ("get_inference_statistics", ()), ("get_model_repository_index", ()),
     ("unload_model", ("tiny-sd15",))],
    ids=["model-config", "statistics", "model-repository", "unload"],
)
def test_other_grpc_apis_are_refused_when_no_key_is_sent(
    tiny_server: TritonServer, call: str, arguments: tuple[str, ...]
) -> None:
    with _grpc_client(tiny_server) as client, pytest.raises(InferenceServerException) as caught:
        getattr(client, call)(*arguments)
    assert INFER_KEY_HEADER in caught.value.message()
    with tiny_server.http_client() as client:
        assert client.is_model_ready("tiny-sd15")


def test_grpc_model_unload_is_refused_even_with_the_key(tiny_server: TritonServer) -> None:
    with _grpc_client(tiny_server) as client, \
            pytest.raises(InferenceServerException, match="explicit model load / unload is not allowed"):
        client.unload_model("tiny-sd15", headers=grpc_key_headers(tiny_server.infer_key))
    with tiny_server.http_client() as client:
        assert client.is_model_ready("tiny-sd15")


def _grpc_client(server: TritonServer) -> Any:
    return triton.grpc_client(f"127.0.0.1:{server.options.grpc_port}")
