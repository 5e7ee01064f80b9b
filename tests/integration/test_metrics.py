"""The models' diffusers_* metrics on the real tritonserver's metrics endpoint, next to Triton's own."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest
from tritonclient.utils import InferenceServerException

from diffusers_backend import metrics
from inference_client import contract
from triton_launcher.server import LOOPBACK, TritonServer

from .conftest import TINY_MODELS, Generator

Series = tuple[str, frozenset[tuple[str, str]]]
"""A metric name and its labels."""

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)")
_LABEL = re.compile(r'(?P<name>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')
MODEL = "tiny-sdxl"
"""A model whose scheduler runs exactly the steps asked for (tiny-sd15's PNDM runs one more)."""


def scrape_text(server: TritonServer) -> str:
    # No proxy: the endpoint is on loopback, and a proxy from the environment must not see it.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{LOOPBACK}:{server.options.metrics_port}/metrics", timeout=30) as response:
        text: str = response.read().decode("utf-8")
    return text


def parse_samples(text: str) -> dict[Series, float]:
    samples: dict[Series, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        labels = frozenset((label["name"], label["value"]) for label in _LABEL.finditer(match["labels"] or ""))
        samples[match["name"], labels] = float(match["value"])
    return samples


def series(name: str, model: str = MODEL, **labels: str) -> Series:
    return name, frozenset({"model": model, "version": "1", **labels}.items())


def changes(before: dict[Series, float], after: dict[Series, float], *wanted: Series) -> dict[Series, float]:
    return {key: after[key] - before[key] for key in wanted}


def scrape_until(server: TritonServer, wanted: dict[Series, float], before: dict[Series, float],
                 timeout_s: float = 30.0) -> dict[Series, float]:
    """The samples once every ``wanted`` series moved by its amount since ``before`` (Triton reports its own
    inference statistics after the responses are sent, so they may trail the response briefly)."""
    deadline = time.monotonic() + timeout_s
    while True:
        after = parse_samples(scrape_text(server))
        if changes(before, after, *wanted) == wanted or time.monotonic() > deadline:
            return after


def test_every_model_has_its_diffusers_series_from_the_start_next_to_tritons_own(tiny_server: TritonServer) -> None:
    text = scrape_text(tiny_server)
    samples = parse_samples(text)
    for name, kind in ((metrics.IMAGES, "counter"), (metrics.ERRORS, "counter"), (metrics.STEPS, "counter"),
                       (metrics.STEP_SECONDS, "histogram"), (metrics.CALL_SECONDS, "histogram"),
                       (metrics.BATCH_SIZE, "histogram")):
        assert f"# TYPE {name} {kind}" in text
    for model in TINY_MODELS:
        assert series("nv_inference_count", model) in samples
        assert series(metrics.IMAGES, model) in samples
        for kind in metrics.ERROR_KINDS:
            assert series(metrics.ERRORS, model, kind=kind) in samples
        assert series(metrics.STEP_SECONDS + "_bucket", model, le="0.005") in samples
        assert series(metrics.BATCH_SIZE + "_bucket", model, le="4") in samples


def test_a_generation_and_a_refusal_move_the_counters_by_exactly_what_they_did(
    tiny_server: TritonServer, generator: Generator
) -> None:
    steps = 3
    before = parse_samples(scrape_text(tiny_server))
    image = generator.generate(MODEL, num_inference_steps=steps, seed=5)
    assert image.seed == 5
    with pytest.raises(InferenceServerException) as refused:
        generator.infer(MODEL, contract.TextToImage("a red cube", width=100))
    assert refused.value.status() == "400"

    expected = {
        series(metrics.IMAGES): 1.0,
        series(metrics.STEPS): float(steps),
        series(metrics.ERRORS, kind=metrics.INVALID_REQUEST): 1.0,
        series(metrics.ERRORS, kind=metrics.SAFETY_CHECKER): 0.0,
        series(metrics.ERRORS, kind=metrics.GENERATION_ERROR): 0.0,
        series(metrics.ERRORS, kind=metrics.CANCELLED): 0.0,
        # The first step of a call is not timed (it includes prompt encoding): steps - 1 observations.
        series(metrics.STEP_SECONDS + "_count"): float(steps - 1),
        series(metrics.CALL_SECONDS + "_count"): 1.0,
        series(metrics.BATCH_SIZE + "_count"): 1.0,
        series(metrics.BATCH_SIZE + "_sum"): 1.0,
        series(metrics.BATCH_SIZE + "_bucket", le="1"): 1.0,
        # Triton's own: the Python backend's error response counts as a successful inference there, which is
        # why the kind of error is counted by the model.
        series("nv_inference_count"): 2.0,
        series("nv_inference_request_success"): 2.0,
        series("nv_inference_request_failure", reason="BACKEND"): 0.0,
    }
    after = scrape_until(tiny_server, expected, before)
    assert changes(before, after, *expected) == expected
    # Another model saw none of it.
    other = series(metrics.IMAGES, "tiny-sd3")
    assert after[other] == before[other]
    # The call took as long as its steps at least, and every observation is positive.
    step_seconds = changes(before, after, series(metrics.STEP_SECONDS + "_sum"))
    call_seconds = changes(before, after, series(metrics.CALL_SECONDS + "_sum"))
    assert 0 < sum(step_seconds.values()) < sum(call_seconds.values())
