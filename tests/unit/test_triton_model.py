"""The pb_utils glue, with a fake triton_python_backend_utils and a fake image generator (no Triton, no torch)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from diffusers_backend.errors import GenerationError, InvalidRequestError, RequestCancelledError
from diffusers_backend.service import DiffusersService
from diffusers_backend.settings import ModelSettings
from diffusers_backend.triton_model import DiffusersTritonModel
from diffusers_backend.validation import GenerationRequest, RequestLimits
from inference_client.contract import TextToImage

from .test_metrics import FakeMetricFamily
from .test_validation import SD15_TRAITS


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class FakeRequest:
    def __init__(self, arrays: dict[str, np.ndarray], cancelled_after_checks: int | None = None) -> None:
        self.tensors = {name: FakeTensor(name, array) for name, array in arrays.items()}
        self.cancelled_after_checks = cancelled_after_checks
        """None: never cancelled; k: is_cancelled() says yes from its (k+1)-th call on."""
        self.checks = 0

    def is_cancelled(self) -> bool:
        self.checks += 1
        return self.cancelled_after_checks is not None and self.checks > self.cancelled_after_checks

    def get_response_sender(self) -> FakeSender:
        self.sender = FakeSender()
        return self.sender


class FakeSender:
    """A decoupled request's response sender: records what was sent, with the flags."""

    def __init__(self) -> None:
        self.sent: list[tuple[FakeResponse, int]] = []

    def send(self, response: FakeResponse, flags: int = 0) -> None:
        assert not any(flags for _, flags in self.sent), "nothing may follow the final response"
        self.sent.append((response, flags))


class FakeTritonError:
    INVALID_ARG = "INVALID_ARG"
    INTERNAL = "INTERNAL"
    CANCELLED = "CANCELLED"

    def __init__(self, message: str, code: str) -> None:
        self.message, self.code = message, code


class FakeResponse:
    def __init__(self, output_tensors: list[FakeTensor] | None = None, error: FakeTritonError | None = None):
        self.outputs = {tensor.name: tensor.array for tensor in output_tensors or []}
        self.error = error


FINAL = 1


@pytest.fixture
def fake_pb_utils(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = FakeTensor  # type: ignore[attr-defined]
    module.TritonError = FakeTritonError  # type: ignore[attr-defined]
    module.InferenceResponse = FakeResponse  # type: ignore[attr-defined]
    module.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL  # type: ignore[attr-defined]
    module.MetricFamily = FakeMetricFamily()  # type: ignore[attr-defined]
    module.get_input_tensor_by_name = lambda request, name: request.tensors.get(name)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return module


class RecordingGenerator:
    """Paints each image with its request's seed, and records the groups it was called with."""

    def __init__(self, fail_width: int | None = None) -> None:
        self.calls: list[list[GenerationRequest]] = []
        self.fail_width = fail_width

    def generate(self, group: Sequence[GenerationRequest], stop_requested: Callable[[], bool] | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> list[np.ndarray | InvalidRequestError]:
        self.calls.append(list(group))
        if group[0].width == self.fail_width:
            raise GenerationError("out of memory")
        for step in range(1, group[0].steps + 1):  # told and asked after every step, as the engine does
            if on_step is not None:
                on_step(step, group[0].steps)
            if stop_requested is not None and stop_requested():
                raise RequestCancelledError(f"cancelled by the caller after step {step} of {group[0].steps}")
        return [np.full((r.height, r.width, 3), r.seed % 256, dtype=np.uint8) for r in group]


MODEL_CONFIG = {
    "input": [{"name": name} for name in ("PROMPT", "NEGATIVE_PROMPT", "WIDTH", "HEIGHT",
                                           "NUM_INFERENCE_STEPS", "GUIDANCE_SCALE", "SEED")],
    "parameters": {"model_id": {"string_value": "org/model"}},
}


def initialized_model(monkeypatch: pytest.MonkeyPatch, generator: RecordingGenerator, kind: str = "GPU",
                      config: dict[str, Any] = MODEL_CONFIG) -> DiffusersTritonModel:
    loaded: dict[str, Any] = {}

    def fake_load(settings: ModelSettings, placement: Any, model_directory: Any = None,
                  core_sharing: Any = None) -> DiffusersService:
        loaded.update(settings=settings, placement=placement, core_sharing=core_sharing)
        return DiffusersService(generator, RequestLimits.for_model(SD15_TRAITS, settings), settings.model_id)

    monkeypatch.setattr(DiffusersService, "load", staticmethod(fake_load))
    model = DiffusersTritonModel()
    model.initialize({"model_name": "sd15", "model_config": json.dumps(config),
                      "model_instance_kind": kind, "model_instance_device_id": "1",
                      "model_repository": "/models/sd15", "model_version": "1"})
    assert loaded["placement"].torch_device == ("cuda:1" if kind == "GPU" else "cpu")
    assert loaded["core_sharing"] is model.core_sharing
    return model


def answers(model: DiffusersTritonModel, requests: list[FakeRequest]) -> list[Any]:
    """The responses of a model that answers once per request (not decoupled)."""
    responses = model.execute(requests)
    assert responses is not None
    return responses


def cpu_groups(*counts: int) -> list[dict[str, Any]]:
    return [{"kind": "KIND_CPU", "count": count} for count in counts]


@pytest.mark.usefixtures("fake_pb_utils")
@pytest.mark.parametrize(
    ("kind", "changes", "shared"),
    [
        ("CPU", {"instance_group": cpu_groups(2)}, True),
        ("CPU", {"instance_group": cpu_groups(1)}, True),  # other models' CPU instances share the cores too
        ("CPU", {"instance_group": cpu_groups(2), "parameters": {"model_id": {"string_value": "org/model"},
                                                                 "share_cpu_cores": {"string_value": "false"}}},
         False),
        ("GPU", {"instance_group": [{"kind": "KIND_GPU", "count": 2}]}, False),
    ],
)
def test_initialize_shares_cpu_cores_only_when_the_instance_is_on_the_cpu_and_sharing_is_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str, changes: dict[str, Any], shared: bool,
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = initialized_model(monkeypatch, RecordingGenerator(), kind, {**MODEL_CONFIG, **changes})
    assert (model.core_sharing is not None) is shared
    model.finalize()
    assert list((tmp_path / f"triton-diffusers-{os.getuid()}").glob("*/*")) == []


def request(**fields: Any) -> FakeRequest:
    return FakeRequest(TextToImage(**fields).arrays())


def test_execute_answers_each_request_in_order_when_batch_mixes_good_and_bad(
    fake_pb_utils: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = RecordingGenerator()
    model = initialized_model(monkeypatch, generator)
    responses = answers(model, [
        request(prompt="a", width=64, height=32, seed=7),
        request(prompt="", seed=8),
        request(prompt="b", width=128, height=64, seed=9),
        request(prompt="c", width=64, height=32, seed=10),
    ])
    assert [response.error is None for response in responses] == [True, False, True, True]
    assert responses[1].error.code == FakeTritonError.INVALID_ARG
    assert responses[1].error.message.startswith("PROMPT=''")
    assert responses[0].outputs["IMAGE"].shape == (1, 32, 64, 3)
    assert responses[2].outputs["IMAGE"].shape == (1, 64, 128, 3)
    assert [int(r.outputs["SEED"][0, 0]) for r in (responses[0], responses[2], responses[3])] == [7, 9, 10]
    assert responses[3].outputs["IMAGE"][0, 0, 0, 0] == 10
    assert [[r.seed for r in call] for call in generator.calls] == [[7, 10], [9]]


def test_execute_fails_only_the_failing_group_when_one_pipeline_call_raises(
    fake_pb_utils: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = initialized_model(monkeypatch, RecordingGenerator(fail_width=128))
    responses = answers(model, [request(prompt="a", width=128, height=64), request(prompt="b", width=64, height=64)])
    assert responses[0].error.code == FakeTritonError.INTERNAL
    assert "out of memory" in responses[0].error.message
    assert responses[1].error is None


def test_initialize_names_the_model_when_a_parameter_is_unknown(
    fake_pb_utils: types.ModuleType,
) -> None:
    config = dict(MODEL_CONFIG, parameters={"model_id": {"string_value": "m"}, "colour": {"string_value": "x"}})
    model = DiffusersTritonModel()
    with pytest.raises(RuntimeError, match=r"Triton model 'sd15' failed to load: .*\['colour'\] are unknown"):
        model.initialize({"model_name": "sd15", "model_config": json.dumps(config), "model_instance_kind": "CPU",
                          "model_instance_device_id": "0", "model_repository": "/models/sd15"})


def test_warm_up_fails_the_load_when_the_pipeline_cannot_generate() -> None:
    from diffusers_backend.errors import ModelLoadError

    generator = RecordingGenerator(fail_width=64)
    service = DiffusersService(generator, RequestLimits.for_model(SD15_TRAITS, ModelSettings("m")), "m")
    with pytest.raises(ModelLoadError, match="model 'm' loaded but cannot generate: out of memory"):
        service.warm_up()
    assert [(r.width, r.steps, r.seed) for r in generator.calls[0]] == [(64, 1, 0)]


@pytest.mark.usefixtures("fake_pb_utils")
def test_cancelled_requests_get_cancelled_errors_and_stop_their_group_only_when_every_caller_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generator = RecordingGenerator()
    model = initialized_model(monkeypatch, generator)

    def request(seed: int, width: int, cancelled_after_checks: int | None) -> FakeRequest:
        arrays = TextToImage("p", width=width, height=64, num_inference_steps=6, seed=seed).arrays()
        return FakeRequest(arrays, cancelled_after_checks)

    gone_before = request(1, 64, cancelled_after_checks=0)
    staying = request(2, 64, cancelled_after_checks=None)
    leaving_late = request(3, 64, cancelled_after_checks=3)
    both_leave = [request(4, 128, cancelled_after_checks=2), request(5, 128, cancelled_after_checks=4)]
    responses = answers(model, [gone_before, staying, leaving_late, *both_leave])

    assert responses[0].error.code == FakeTritonError.CANCELLED
    assert "before it started" in responses[0].error.message
    # One caller stays, so the shared call runs to the end and both get their image.
    assert responses[1].error is None
    assert responses[2].error is None
    assert int(responses[2].outputs["SEED"][0, 0]) == 3
    # The 128-wide group: each caller is asked once before it starts, then after every step until both are
    # gone; the second one leaves at its 5th question, after step 5 of 6.
    for response in responses[3:]:
        assert response.error.code == FakeTritonError.CANCELLED
        assert response.error.message == "cancelled by the caller after step 5 of 6"
    assert [len(call) for call in generator.calls] == [2, 2]


@pytest.mark.usefixtures("fake_pb_utils")
def test_a_decoupled_model_streams_progress_after_every_step_then_one_final_response_per_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generator = RecordingGenerator(fail_width=128)
    model = initialized_model(monkeypatch, generator, config={**MODEL_CONFIG,
                                                              "model_transaction_policy": {"decoupled": True}})
    requests = [
        FakeRequest(TextToImage("p", width=64, height=64, num_inference_steps=3, seed=7).arrays()),
        FakeRequest(TextToImage("p", width=128, height=64, num_inference_steps=3, seed=8).arrays()),
        FakeRequest(TextToImage("p", width=64, height=64, num_inference_steps=0).arrays()),
        FakeRequest(TextToImage("p", width=64, height=32, num_inference_steps=3).arrays(), cancelled_after_checks=0),
    ]
    assert model.execute(requests) is None  # decoupled: everything goes through the senders

    progress, (final, flags) = requests[0].sender.sent[:-1], requests[0].sender.sent[-1]
    assert [(int(response.outputs["STEPS_DONE"][0, 0]), int(response.outputs["STEPS"][0, 0]))
            for response, _ in progress] == [(1, 3), (2, 3), (3, 3)]
    assert all(flag == 0 for _, flag in progress)
    elapsed = [float(response.outputs["ELAPSED_S"][0, 0]) for response, _ in progress]
    assert elapsed == sorted(elapsed)
    assert flags == FINAL
    assert final.error is None
    assert int(final.outputs["SEED"][0, 0]) == 7
    assert final.outputs["IMAGE"].shape == (1, 64, 64, 3)
    # A failed call, a refused request and a cancelled one each get exactly one final response: an error.
    for request, code in zip(requests[1:], ("INTERNAL", "INVALID_ARG", "CANCELLED"), strict=True):
        last, last_flags = request.sender.sent[-1]
        assert last_flags == FINAL
        assert last.error is not None
        assert last.error.code == code
        assert all(response.error is None for response, _ in request.sender.sent[:-1])


def test_the_model_counts_its_requests_in_metrics_labelled_with_its_name_and_version(
    fake_pb_utils: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers_backend import metrics

    model = initialized_model(monkeypatch, RecordingGenerator(), config={
        **MODEL_CONFIG, "model_transaction_policy": {"decoupled": True}})
    requests = [
        FakeRequest(TextToImage("p", width=64, height=64, num_inference_steps=3, seed=7).arrays()),
        FakeRequest(TextToImage("p", width=64, height=64, num_inference_steps=0).arrays()),
        FakeRequest(TextToImage("p", width=64, height=32, num_inference_steps=3).arrays(), cancelled_after_checks=0),
    ]
    model.execute(requests)
    registry = fake_pb_utils.MetricFamily
    assert registry.counts("sd15") == {"images": 1.0, "invalid_request": 1.0, "safety_checker": 0.0,
                                       "generation_error": 0.0, "cancelled": 1.0}
    assert registry.value(metrics.STEPS, "sd15") == 3
    model.finalize()
    assert [family.live_metrics for family in registry.families.values()] == [0] * len(registry.families)


def test_the_model_serves_without_metrics_when_triton_refuses_them(
    fake_pb_utils: types.ModuleType, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refusing(name: str, description: str, kind: str) -> None:
        raise RuntimeError("Error when creating MetricFamily: metrics are disabled")

    refusing.COUNTER = refusing.HISTOGRAM = "kind"  # type: ignore[attr-defined]
    monkeypatch.setattr(fake_pb_utils, "MetricFamily", refusing)
    model = initialized_model(monkeypatch, RecordingGenerator())
    assert "sd15: serving without its diffusers_* metrics" in caplog.text
    (response,) = answers(model, [request(prompt="a", width=64, height=32, seed=7)])
    assert response.error is None
    model.finalize()


def test_refused_and_failed_requests_free_their_inputs_without_the_garbage_collector() -> None:
    # A caught error kept as an outcome held its traceback, so the frames that parsed the request (and with them
    # a hostile multi-megabyte prompt) stayed alive until a collection: tens of MiB in a stub under such load.
    import gc
    import weakref

    generator = RecordingGenerator(fail_width=64)
    service = DiffusersService(generator, RequestLimits.for_model(SD15_TRAITS, ModelSettings("m")), "m")
    refused = {"PROMPT": np.array([[b"\xff" * 2**20]], dtype=np.object_)}
    failing = {"PROMPT": np.array([[b"a cat"]], dtype=np.object_), "WIDTH": np.array([[64]], dtype=np.int32)}
    watched: list[weakref.ref[np.ndarray]] = [weakref.ref(refused["PROMPT"]), weakref.ref(failing["PROMPT"])]
    gc.disable()
    try:
        outcomes = service.execute([refused, failing])
        assert [type(outcome) for outcome in outcomes] == [InvalidRequestError, GenerationError]
        assert "PROMPT" in str(outcomes[0])
        assert "out of memory" in str(outcomes[1])
        del refused, failing
        assert [reference() for reference in watched] == [None, None]
    finally:
        gc.enable()
