"""Property-based fuzzing of the raw Triton tensors against the real tritonserver (tiny-sd15 and tiny-flux).

Each example is a request with at least one hostile input: a wrong datatype or shape, an extra, duplicated or
missing input, a batch beyond ``max_batch_size``, sizes like 8192 or 2**31-1, empty, blank, NUL-holding,
non-UTF-8 or multi-megabyte text, NaN or infinite guidance, extreme int64 seeds. Properties: every one gets a
400 whose message names an input of the request (the model's own ``NAME=value is invalid: rule``, or Triton's
refusal of a datatype, shape or batch), the model's stub processes are the same processes afterwards, a valid
request right after succeeds, and the memory of the server and its stubs does not grow beyond a stated bound.

test_errors.py covers one example of each refusal; this file covers their combinations and extremes. No example
is valid, so nothing is generated during the fuzz and a run takes seconds.
"""

from __future__ import annotations

import http.client
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.http import InferInput
from tritonclient.utils import InferenceServerException

from inference_client import contract
from triton_launcher.repository import build_tiny_repository, with_cpu_instances
from triton_launcher.server import TritonServer

from .conftest import Generator, tiny_server_options

FUZZED_MODELS = ("tiny-sd15", "tiny-flux")
"""One UNet family with classifier-free guidance and one guidance-distilled transformer family (16-pixel sizes)."""
MAX_BATCH_SIZE = 4
MAX_SIDE = 2048
MAX_STEPS = 100
MAX_GUIDANCE_SCALE = 30.0
MAX_PROMPT_BYTES = 4096
FUZZ = settings(
    max_examples=60,
    deadline=None,  # latency on 2 busy cores says nothing about correctness
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MEMORY_GROWTH_BOUND = 32 * 2**20
"""Growth allowed between two equal phases of hostile requests, each sending about 290 MiB of prompts (see
test_memory...). The first phase is not judged: a stub's allocator keeps up to about 90 MiB after its first
dozens of 3 MiB requests (glibc raises its mmap threshold after freeing such a block, so later ones come from a
heap that it keeps), then stays flat: 0.0 MiB measured over the second phase. A leak of even a sixth of the
payload shows in it, and so do refused prompts kept for the garbage collector (a stub grew 3 to 36 MiB a phase,
varying with when collections fell, while its refusals kept their tracebacks)."""
LARGE_PROMPT_BYTES = 3 * 2**20
"""Multi-megabyte but far below Triton's 64 MiB HTTP body limit, so the model, not the front end, refuses it."""

# Triton's own refusals of a request's form, checked before the model sees it.
TRITON_REFUSALS = re.compile(
    r"data-type is '\w+', but model '[\w-]+' expects|unexpected shape for input|batch size does not match|"
    r"batch-size must be <= 4|unexpected inference input|already exists in request|missing required input|"
    r"expected \d+ string elements"
)


@dataclass
class Tensor:
    name: str
    datatype: str
    array: np.ndarray

    def infer_input(self) -> InferInput:
        tensor = InferInput(self.name, list(self.array.shape), self.datatype)
        tensor.set_data_from_numpy(self.array, binary_data=True)
        return tensor


@dataclass
class HostileRequest:
    tensors: list[Tensor]
    refused_by_model: set[str] = field(default_factory=set)
    """Inputs whose value the model must refuse, naming one of them."""
    refused_by_triton: bool = False
    """The request's form is wrong: Triton refuses it before the model sees it."""

    def describe(self) -> str:
        return ", ".join(f"{t.name}:{t.datatype}{list(t.array.shape)}" for t in self.tensors)


def text_tensor(name: str, value: bytes) -> Tensor:
    return Tensor(name, "BYTES", np.array([[value]], dtype=np.object_))


CONTRACT_TYPES = {"PROMPT": ("BYTES", np.object_), "NEGATIVE_PROMPT": ("BYTES", np.object_),
                  "WIDTH": ("INT32", np.int32), "HEIGHT": ("INT32", np.int32),
                  "NUM_INFERENCE_STEPS": ("INT32", np.int32), "GUIDANCE_SCALE": ("FP32", np.float32),
                  "SEED": ("INT64", np.int64)}
WRONG_TYPES = {"BYTES": [("INT32", np.int32), ("FP32", np.float32), ("UINT8", np.uint8)],
               "INT32": [("INT64", np.int64), ("INT16", np.int16), ("UINT32", np.uint32), ("FP32", np.float32),
                         ("BYTES", np.object_)],
               "FP32": [("FP64", np.float64), ("FP16", np.float16), ("INT32", np.int32), ("BYTES", np.object_)],
               "INT64": [("INT32", np.int32), ("UINT64", np.uint64), ("FP64", np.float64)]}
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
VISIBLE_TEXT = st.text(min_size=1, max_size=40).filter(lambda text: text.strip() and "\x00" not in text)
INVALID_UTF8 = st.one_of(
    st.sampled_from([b"caf\xe9", b"\xed\xa0\x80", b"\xff\xfe", b"\xc0\xaf", b"a\x80"]),
    st.binary(min_size=1, max_size=16).filter(lambda raw: not is_utf8(raw)),
)


def is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def valid_values(model: str) -> dict[str, st.SearchStrategy[Tensor]]:
    side = st.integers(1, 16).map(lambda n: np.array([[n * 16]], dtype=np.int32))
    # SD1.5 uses a negative prompt only above guidance 1; schnell takes no guidance and no negative prompt, where
    # an empty one means "none".
    guided = model != "tiny-flux"
    guidance = st.floats(1.5, MAX_GUIDANCE_SCALE, width=32) if guided else st.just(0.0)
    negative = VISIBLE_TEXT.map(str.encode) if guided else st.sampled_from([b"", b"  "])
    return {
        "PROMPT": VISIBLE_TEXT.map(lambda text: text_tensor("PROMPT", text.encode())),
        "NEGATIVE_PROMPT": negative.map(lambda raw: text_tensor("NEGATIVE_PROMPT", raw)),
        "WIDTH": side.map(lambda array: Tensor("WIDTH", "INT32", array)),
        "HEIGHT": side.map(lambda array: Tensor("HEIGHT", "INT32", array)),
        "NUM_INFERENCE_STEPS": st.integers(1, 4).map(
            lambda n: Tensor("NUM_INFERENCE_STEPS", "INT32", np.array([[n]], dtype=np.int32))),
        "GUIDANCE_SCALE": guidance.map(
            lambda value: Tensor("GUIDANCE_SCALE", "FP32", np.array([[value]], dtype=np.float32))),
        "SEED": st.integers(0, 2**63 - 1).map(lambda seed: Tensor("SEED", "INT64", np.array([[seed]], np.int64))),
    }


def invalid_values(model: str, large_prompts: bool) -> dict[str, st.SearchStrategy[Tensor]]:
    """Right datatype and shape, value the model must refuse."""
    multiple = 16 if model == "tiny-flux" else 8

    def bad_side(value: int) -> bool:
        return value < 1 or value % multiple != 0 or value > MAX_SIDE

    sizes = [MAX_PROMPT_BYTES + 1, 65536] + ([LARGE_PROMPT_BYTES] if large_prompts else [])
    bad_text = st.one_of(
        st.sampled_from([b"", b" \t\n"]), INVALID_UTF8,
        VISIBLE_TEXT.map(lambda text: text.encode()[:8] + b"\x00" + text.encode()),
        st.tuples(st.sampled_from([b"x", b"\x00", b"\xff", "é".encode()]), st.sampled_from(sizes)).map(
            lambda unit_and_size: unit_and_size[0] * (unit_and_size[1] // len(unit_and_size[0]) + 1)),
    )
    bad_negative = bad_text.filter(lambda raw: not (is_utf8(raw) and not raw.decode().strip()))  # blank is "none"
    if model == "tiny-flux":
        bad_negative = st.one_of(bad_negative, VISIBLE_TEXT.map(str.encode))
    bad_sides = st.one_of(st.sampled_from([8192, 2**31 - 1, -(2**31), 0, MAX_SIDE + multiple]),
                          INT32.filter(bad_side))
    bad_guidance = st.one_of(
        st.sampled_from([math.nan, math.inf, -math.inf, -1.0, MAX_GUIDANCE_SCALE * 2]),
        st.floats(width=32).filter(lambda value: not 0 <= value <= MAX_GUIDANCE_SCALE),
    )
    if model == "tiny-flux":  # guidance-distilled: anything but its default (0) is refused
        bad_guidance = st.one_of(bad_guidance, st.floats(0, MAX_GUIDANCE_SCALE, width=32).filter(bool))

    def side(name: str) -> st.SearchStrategy[Tensor]:
        return bad_sides.map(lambda value: Tensor(name, "INT32", np.array([[value]], dtype=np.int32)))

    return {
        "PROMPT": bad_text.map(lambda raw: text_tensor("PROMPT", raw)),
        "NEGATIVE_PROMPT": bad_negative.map(lambda raw: text_tensor("NEGATIVE_PROMPT", raw)),
        "WIDTH": side("WIDTH"),
        "HEIGHT": side("HEIGHT"),
        "NUM_INFERENCE_STEPS": st.one_of(st.sampled_from([0, -1, MAX_STEPS + 1, 2**31 - 1, -(2**31)]),
                                         INT32.filter(lambda n: not 1 <= n <= MAX_STEPS)).map(
            lambda n: Tensor("NUM_INFERENCE_STEPS", "INT32", np.array([[n]], dtype=np.int32))),
        "GUIDANCE_SCALE": bad_guidance.map(
            lambda value: Tensor("GUIDANCE_SCALE", "FP32", np.array([[value]], dtype=np.float32))),
        "SEED": st.one_of(st.just(-(2**63)), st.integers(-(2**63), -1)).map(
            lambda seed: Tensor("SEED", "INT64", np.array([[seed]], dtype=np.int64))),
    }


@st.composite
def hostile_requests(draw: st.DrawFn, model: str) -> HostileRequest:
    valid = valid_values(model)
    batch = draw(st.sampled_from([1] * 6 + [2, MAX_BATCH_SIZE, MAX_BATCH_SIZE + 1, 64]))
    invalid = invalid_values(model, large_prompts=batch == 1)  # a 3 MiB prompt times 64 is not the point
    request = HostileRequest(tensors=[])
    present = draw(st.sets(st.sampled_from(list(CONTRACT_TYPES)), min_size=1))
    hostile = draw(st.sets(st.sampled_from(sorted(present)), min_size=1, max_size=3))
    for name in CONTRACT_TYPES:
        if name not in present:
            continue
        if name in hostile:
            request.tensors.append(draw(invalid[name]))
            request.refused_by_model.add(name)
        else:
            request.tensors.append(draw(valid[name]))
    if "PROMPT" not in present:
        request.refused_by_model.add("PROMPT")  # "PROMPT is missing" (Triton lets optional inputs come alone)

    form_changes = draw(st.lists(st.sampled_from(["datatype", "shape", "extra", "duplicate", "batch-mismatch"]),
                                 max_size=2, unique=True))
    for change in form_changes:
        change_form(draw, request.tensors, change)
    request.refused_by_triton = bool(form_changes)
    if batch > 1:
        # The same batch for every input: Triton refuses it beyond max_batch_size, the model below it (one image
        # per request); in the second case the model names whichever input it reads first.
        request.tensors = [Tensor(t.name, t.datatype, np.repeat(t.array, batch, axis=0)) for t in request.tensors]
        if batch > MAX_BATCH_SIZE:
            request.refused_by_triton = True
        else:
            request.refused_by_model |= {tensor.name for tensor in request.tensors}
    if not request.tensors:
        request.refused_by_triton = True
    return request


def change_form(draw: st.DrawFn, tensors: list[Tensor], change: str) -> None:
    """Break the form of the request (what Triton itself checks against config.pbtxt) in one way."""
    target = draw(st.sampled_from(tensors))
    position = tensors.index(target)
    if change == "datatype":
        datatype, dtype = draw(st.sampled_from(WRONG_TYPES[target.datatype]))
        array = np.array([[b"64"]], dtype=np.object_) if dtype is np.object_ else np.array([[64]], dtype=dtype)
        tensors[position] = Tensor(target.name, datatype, array)
    elif change == "shape":
        shape = draw(st.sampled_from([(1, 2), (1,), (1, 1, 1), (1, 0), (1, 3, 2)]))
        array = np.resize(target.array, shape) if math.prod(shape) else np.empty(shape, dtype=target.array.dtype)
        tensors[position] = Tensor(target.name, target.datatype, array)
    elif change == "extra":
        name = draw(st.sampled_from(["FOO", "IMAGE", "prompt", "PROMPT ", "SEED\x00", "ÉCHELLE"]))
        tensors.append(Tensor(name, "INT32", np.array([[1]], dtype=np.int32)))
    elif change == "duplicate":
        tensors.append(target)
    else:  # one input with a batch of its own
        tensors[position] = Tensor(target.name, target.datatype, np.repeat(target.array, 3, axis=0))


def stub_processes(server: TritonServer, model: str) -> dict[int, float]:
    """PID → start time of each stub process of ``model`` (the pair tells a restarted process from its parent)."""
    assert server.process is not None
    stubs = {}
    for child in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if any(f"/{model}/1/model.py" in part for part in child.cmdline()):
                stubs[child.pid] = child.create_time()
        except psutil.NoSuchProcess:  # a process of another model exiting is not this test's business
            continue
    return stubs


def unique_memory(server: TritonServer) -> dict[int, int]:
    """PID → USS of the server and each of its stubs: memory that would be freed if it exited, shared pages
    excluded."""
    assert server.process is not None
    server_process = psutil.Process(server.process.pid)
    return {process.pid: process.memory_full_info().uss for process in (server_process, *server_process.children(True))}


@pytest.fixture(scope="module")
def single_instance_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A server of its own whose fuzzed models have one instance each, so every request reaches the stub that the
    first phase warmed up. With the tiny repository's two, the rate limiter hands lone requests to the spare
    instance once the first has run a thousand times as often, and a stub's first 3 MiB requests grow its heap
    (see MEMORY_GROWTH_BOUND) in whichever phase that switch falls: no leak, but not what this test measures."""
    root = tmp_path_factory.mktemp("fuzz-memory")
    repository = build_tiny_repository(repository=root / "model_repository",
                                       families=[model.removeprefix("tiny-") for model in FUZZED_MODELS], streaming=())
    for model in FUZZED_MODELS:
        config = repository / model / "config.pbtxt"
        config.write_text(with_cpu_instances(config.read_text(encoding="utf-8"), 1), encoding="utf-8")
    with TritonServer(tiny_server_options(repository, root)) as server:
        yield server


@pytest.fixture(scope="module")
def fuzz_client(tiny_server: TritonServer) -> Iterator[Any]:
    # A bounded network timeout: a hang would surface as a timeout error, which no assertion below accepts.
    client = tiny_server.http_client(timeout_s=120)
    yield client
    client.close()


def send(client: Any, server: TritonServer, model: str, request: HostileRequest) -> InferenceServerException:
    try:
        result = client.infer(model, [tensor.infer_input() for tensor in request.tensors], headers=server.headers)
    except InferenceServerException as error:
        return error
    image = contract.read_result(result).image
    pytest.fail(f"a hostile request was served ({image.shape}): {request.describe()}")


def assert_refused_clearly(error: InferenceServerException, request: HostileRequest) -> None:
    message = error.message() or ""
    assert error.status() == "400", (error.status(), message[:300], request.describe())
    assert len(message) < 2000, message[:300]  # a megabyte prompt is described, never echoed
    names = {tensor.name for tensor in request.tensors} | {"PROMPT"}
    if request.refused_by_triton and TRITON_REFUSALS.search(message):
        assert any(f"'{name}'" in message for name in names) or "batch-size must be" in message, message[:300]
        return
    # The model's own refusal: "NAME=value is invalid: rule" or "NAME is missing: rule", for a refused input.
    named = re.match(r"([A-Z_]+)(=| is missing)", message)
    assert named is not None, (message[:300], request.describe())
    assert named.group(1) in request.refused_by_model, (message[:300], request.describe())


@pytest.mark.parametrize("model", FUZZED_MODELS)
def test_hostile_tensors_get_a_clear_400_and_the_model_keeps_its_processes_and_serves(
    tiny_server: TritonServer, generator: Generator, fuzz_client: Any, model: str
) -> None:
    stubs_before = stub_processes(tiny_server, model)
    assert stubs_before, f"no stub process of {model} found"

    sent: list[str] = []

    @FUZZ
    @given(request=hostile_requests(model))
    def every_hostile_request_is_refused_clearly(request: HostileRequest) -> None:
        sent.append(request.describe())
        assert_refused_clearly(send(fuzz_client, tiny_server, model, request), request)

    every_hostile_request_is_refused_clearly()

    assert len(sent) >= FUZZ.max_examples  # the fuzz ran in full, not stopped early by a filter

    assert stub_processes(tiny_server, model) == stubs_before  # no stub crashed or was restarted
    assert generator.generate(model, num_inference_steps=1).image.shape == (96, 128, 3)


def test_memory_of_server_and_stubs_stays_bounded_when_hostile_requests_repeat(
    single_instance_server: TritonServer,
) -> None:
    server = single_instance_server
    hostile = [
        HostileRequest([text_tensor("PROMPT", b"x" * LARGE_PROMPT_BYTES)], {"PROMPT"}),
        HostileRequest([text_tensor("PROMPT", b"\xff" * LARGE_PROMPT_BYTES)], {"PROMPT"}),
        HostileRequest([text_tensor("PROMPT", b"a red cube"),
                        Tensor("WIDTH", "INT32", np.array([[8192]], dtype=np.int32)),
                        Tensor("HEIGHT", "INT32", np.array([[8192]], dtype=np.int32))], {"WIDTH"}),
        HostileRequest([Tensor("PROMPT", "BYTES", np.array([[b"a"]] * 64, dtype=np.object_))],
                       refused_by_triton=True),
    ]
    rounds = 24  # per phase: 24 x 2 models x 2 prompts of 3 MiB, about 290 MiB through server and stubs

    generator = Generator(server)
    client = server.http_client(timeout_s=120)

    def phase() -> None:
        for _ in range(rounds):
            for model in FUZZED_MODELS:
                for request in hostile:
                    assert_refused_clearly(send(client, server, model, request), request)

    try:
        for model in FUZZED_MODELS:
            generator.generate(model, num_inference_steps=1)
        phase()  # brings the allocators to what they keep under this load
        baseline = unique_memory(server)
        phase()
        after = unique_memory(server)
        growth = {pid: after[pid] - baseline.get(pid, 0) for pid in after}
        assert sum(growth.values()) < MEMORY_GROWTH_BOUND, (
            f"server and stubs grew by {sum(growth.values()) / 2**20:.1f} MiB: "
            + ", ".join(f"{describe_process(pid)} {bytes_ / 2**20:+.1f} MiB" for pid, bytes_ in growth.items()))
        for model in FUZZED_MODELS:
            assert generator.generate(model, num_inference_steps=1).image.shape == (96, 128, 3)
    finally:
        client.close()
        generator.client.close()


def describe_process(pid: int) -> str:
    """The stub's model instance (its command line ends with it) or the server's name."""
    try:
        command = psutil.Process(pid).cmdline()
    except psutil.NoSuchProcess:
        return f"pid {pid} (exited)"
    instances = [part for part in command if re.fullmatch(r".+_\d+_\d+", part)]
    return instances[0] if instances else str(psutil.Process(pid).name())


def test_json_tensor_with_a_huge_declared_shape_is_refused_before_parsing_when_sent_without_the_key(
    tiny_server: TritonServer, generator: Generator
) -> None:
    # With the key, Triton 2.51 aborts (std::bad_alloc) on this body: its JSON parser sizes a buffer from the
    # declared shape. Only the key's holder (the capability layer, which sends binary tensors of shape [1, 1])
    # can send it; anyone else must be turned away before the body is parsed.
    body = json.dumps({"inputs": [
        {"name": "PROMPT", "shape": [1, 1], "datatype": "BYTES", "data": ["a"]},
        {"name": "WIDTH", "shape": [2**40, 1], "datatype": "INT32", "data": [64]},
    ]}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", tiny_server.options.http_port, timeout=120)
    try:
        connection.request("POST", "/v2/models/tiny-sd15/infer", body=body,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = response.read().decode()
    finally:
        connection.close()
    assert response.status == 403, answer
    assert "infer-key" in answer
    assert tiny_server.process is not None
    assert tiny_server.process.poll() is None
    assert generator.generate("tiny-sd15", num_inference_steps=1).image.shape == (96, 128, 3)
