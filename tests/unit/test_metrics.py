"""diffusers_backend.metrics without Triton: a fake ``pb_utils.MetricFamily`` that keeps Triton's rules."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from diffusers_backend import metrics
from diffusers_backend.errors import (
    DiffusersBackendError,
    GenerationError,
    InvalidRequestError,
    ModelLoadError,
    RequestCancelledError,
)
from diffusers_backend.metrics import ModelMetrics, error_kind
from diffusers_backend.service import DiffusersService, GeneratedImage
from diffusers_backend.settings import ModelSettings
from diffusers_backend.validation import GenerationRequest, RequestLimits
from inference_client.contract import TextToImage

from .test_validation import SD15_TRAITS

Labels = frozenset[tuple[str, str]]


class FakeMetric:
    """One series of a family; the metrics of equal labels share it, as Triton's do across instances."""

    def __init__(self, family: FakeFamily, labels: Labels) -> None:
        self.family = family
        self.labels = labels
        family.live_metrics += 1

    def increment(self, value: float) -> None:
        if self.family.kind == FakeMetricFamily.HISTOGRAM or (self.family.kind == FakeMetricFamily.COUNTER
                                                              and value < 0):
            raise RuntimeError(f"Failed to increment metric value: {self.family.name} {value}")
        self.family.values[self.labels] = self.family.values.get(self.labels, 0.0) + value

    def observe(self, value: float) -> None:
        if self.family.kind != FakeMetricFamily.HISTOGRAM:
            raise RuntimeError(f"Failed to observe metric value: {self.family.name} is a {self.family.kind}")
        self.family.observations.setdefault(self.labels, []).append(value)

    def value(self) -> float:
        return self.family.values.get(self.labels, 0.0)

    def __del__(self) -> None:
        self.family.live_metrics -= 1


class FakeFamily:
    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name, self.description, self.kind = name, description, kind
        self.values: dict[Labels, float] = {}
        self.observations: dict[Labels, list[float]] = {}
        self.buckets: dict[Labels, list[float]] = {}
        self.live_metrics = 0
        """Metrics of this family not yet deleted: Triton wants them gone before the family."""

    def Metric(self, labels: dict[str, str], buckets: list[float] | None = None) -> FakeMetric:  # noqa: N802 - pb_utils' name
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise RuntimeError("Failed to create metric. Labels must be a dictionary.")
        if (self.kind == FakeMetricFamily.HISTOGRAM) != (buckets is not None):
            raise RuntimeError("Failed to create metric. Missing required buckets." if buckets is None else
                               "Failed to create metric. Unexpected buckets found.")
        key = frozenset(labels.items())
        if buckets is not None:
            if not isinstance(buckets, list) or buckets != sorted(set(buckets)):
                raise RuntimeError("Failed to create metric. Buckets must be a list.")
            self.buckets[key] = buckets
        self.values.setdefault(key, 0.0)
        return FakeMetric(self, key)


class FakeMetricFamily:
    """Stands for ``pb_utils.MetricFamily``: calling it registers a family (or returns the one of that name,
    as Triton's registry does for a model's second instance); it remembers every series for the checks."""

    COUNTER, GAUGE, HISTOGRAM = "COUNTER", "GAUGE", "HISTOGRAM"

    def __init__(self) -> None:
        self.families: dict[str, FakeFamily] = {}

    def __call__(self, name: str, description: str, kind: str) -> FakeFamily:
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = FakeFamily(name, description, kind)
        elif (family.description, family.kind) != (description, kind):
            raise RuntimeError(f"Error when creating MetricFamily: {name} exists with another kind or help")
        return family

    def value(self, name: str, model: str = "sd15", **labels: str) -> float:
        return self.families[name].values[_labels(model, **labels)]

    def observed(self, name: str, model: str = "sd15") -> list[float]:
        return self.families[name].observations.get(_labels(model), [])

    def counts(self, model: str = "sd15") -> dict[str, float]:
        """Images and each kind of error: every request lands in exactly one of them."""
        errors = {kind: self.value(metrics.ERRORS, model, kind=kind) for kind in metrics.ERROR_KINDS}
        return {"images": self.value(metrics.IMAGES, model), **errors}


def _labels(model: str, **labels: str) -> Labels:
    return frozenset({"model": model, "version": "1", **labels}.items())


class FakePbUtils:
    def __init__(self) -> None:
        self.MetricFamily = FakeMetricFamily()


def no_counts(**changed: float) -> dict[str, float]:
    return {"images": 0.0, **dict.fromkeys(metrics.ERROR_KINDS, 0.0), **changed}


class StepClock:
    """perf_counter stand-in: each reading is ``step_s`` after the previous one."""

    def __init__(self, step_s: float) -> None:
        self.readings = itertools.count()
        self.step_s = step_s

    def __call__(self) -> float:
        return next(self.readings) * self.step_s


class PaintingGenerator:
    """Runs ``steps`` steps per call, then paints; a seed in ``flagged_seeds`` gets the safety checker's
    verdict, a call of width ``failing_width`` fails, and ``stop_requested`` is honoured after each step."""

    def __init__(self, flagged_seeds: Sequence[int] = (), failing_width: int | None = None) -> None:
        self.flagged_seeds = set(flagged_seeds)
        self.failing_width = failing_width
        self.step_callbacks: list[Callable[[int, int], None] | None] = []

    def generate(self, group: Sequence[GenerationRequest], stop_requested: Callable[[], bool] | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> list[np.ndarray | InvalidRequestError]:
        self.step_callbacks.append(on_step)
        steps = group[0].steps
        for step in range(1, steps + 1):
            if on_step is not None:
                on_step(step, steps)
            if stop_requested is not None and stop_requested():
                raise RequestCancelledError(f"cancelled by the caller after step {step} of {steps}")
        if group[0].width == self.failing_width:
            raise GenerationError("out of memory")
        return [InvalidRequestError("PROMPT", request.prompt, "the model's safety checker flagged it")
                if request.seed in self.flagged_seeds else np.zeros((request.height, request.width, 3), np.uint8)
                for request in group]


class Caller:
    def __init__(self, gone_after_questions: int | None = None) -> None:
        self.gone_after_questions = gone_after_questions
        self.questions = 0

    def is_cancelled(self) -> bool:
        self.questions += 1
        return self.gone_after_questions is not None and self.questions > self.gone_after_questions

    def progress(self, steps_done: int, steps: int, elapsed_s: float) -> None:
        pass


def observed_service(generator: PaintingGenerator, step_s: float = 0.5) -> tuple[DiffusersService, FakePbUtils]:
    pb_utils = FakePbUtils()
    service = DiffusersService(generator, RequestLimits.for_model(SD15_TRAITS, ModelSettings("m")), "m")
    service.observer = ModelMetrics(pb_utils, "sd15", "1", clock=StepClock(step_s))
    return service, pb_utils


def arrays(seed: int, width: int = 64, steps: int = 4, prompt: str = "p") -> dict[str, np.ndarray]:
    return TextToImage(prompt, width=width, height=64, num_inference_steps=steps, seed=seed).arrays()


@pytest.mark.parametrize(
    ("error", "from_pipeline", "kind"),
    [
        (InvalidRequestError("WIDTH", 100, "must be a multiple of 8"), False, metrics.INVALID_REQUEST),
        (InvalidRequestError("PROMPT", "p", "flagged"), True, metrics.SAFETY_CHECKER),
        (RequestCancelledError("before it started"), False, metrics.CANCELLED),
        (RequestCancelledError("after step 2 of 4"), True, metrics.CANCELLED),
        (GenerationError("out of memory"), True, metrics.GENERATION_ERROR),
        (DiffusersBackendError("anything else the call raised"), True, metrics.GENERATION_ERROR),
    ],
)
def test_error_kind_names_where_a_request_failed(error: DiffusersBackendError, from_pipeline: bool, kind: str) -> None:
    assert error_kind(error, from_pipeline=from_pipeline) == kind


def test_error_kind_refuses_an_error_that_no_request_ends_with() -> None:
    with pytest.raises(ValueError, match="ModelLoadError is not the error of a request"):
        error_kind(ModelLoadError("no weights"), from_pipeline=False)


def test_every_series_exists_at_zero_before_the_first_request() -> None:
    pb_utils = FakePbUtils()
    ModelMetrics(pb_utils, "sd15", "1")
    assert pb_utils.MetricFamily.counts() == no_counts()
    assert pb_utils.MetricFamily.value(metrics.STEPS) == 0
    families = pb_utils.MetricFamily.families
    assert {name: family.kind for name, family in families.items()} == {
        metrics.IMAGES: "COUNTER", metrics.ERRORS: "COUNTER", metrics.STEPS: "COUNTER",
        metrics.STEP_SECONDS: "HISTOGRAM", metrics.CALL_SECONDS: "HISTOGRAM", metrics.BATCH_SIZE: "HISTOGRAM",
    }
    assert all(name.startswith("diffusers_") for name in families)
    assert families[metrics.BATCH_SIZE].buckets[_labels("sd15")][:4] == [1.0, 2.0, 3.0, 4.0]


def test_each_request_of_a_mixed_batch_is_counted_once_by_how_it_ended() -> None:
    generator = PaintingGenerator(flagged_seeds=[3], failing_width=128)
    service, pb_utils = observed_service(generator)
    outcomes = service.execute([
        arrays(seed=1), arrays(seed=2), arrays(seed=3),        # one call of three: two images, one flagged
        arrays(seed=4, width=100),                             # refused: not a multiple of 8
        arrays(seed=5, prompt=""),                             # refused: empty prompt
        arrays(seed=6, width=128, steps=2),                    # a call that fails
    ])
    assert [type(outcome).__name__ for outcome in outcomes] == [
        "GeneratedImage", "GeneratedImage", "InvalidRequestError", "InvalidRequestError", "InvalidRequestError",
        "GenerationError"]
    assert pb_utils.MetricFamily.counts() == no_counts(images=2, invalid_request=2, safety_checker=1,
                                                       generation_error=1)
    assert pb_utils.MetricFamily.value(metrics.STEPS) == 4 + 2  # each call's steps, once for all its requests
    assert sorted(pb_utils.MetricFamily.observed(metrics.BATCH_SIZE)) == [1.0, 3.0]
    assert len(pb_utils.MetricFamily.observed(metrics.CALL_SECONDS)) == 2


def test_cancelled_requests_count_as_cancelled_whether_before_or_during_their_call() -> None:
    generator = PaintingGenerator()
    service, pb_utils = observed_service(generator)
    callers = [Caller(gone_after_questions=0),                 # gone before its call starts
               Caller(gone_after_questions=3),                 # asked at the start, then after each step: its
                                                               # call stops after step 3 of 4
               Caller()]                                       # its own call runs to the end
    outcomes = service.execute([arrays(seed=1), arrays(seed=2), arrays(seed=3, width=128)], callers)
    assert [type(outcome) for outcome in outcomes] == [RequestCancelledError, RequestCancelledError,
                                                       GeneratedImage]
    assert pb_utils.MetricFamily.counts() == no_counts(images=1, cancelled=2)
    assert pb_utils.MetricFamily.value(metrics.STEPS) == 3 + 4  # the server-side evidence of stopping early
    assert sorted(pb_utils.MetricFamily.observed(metrics.BATCH_SIZE)) == [1.0, 1.0]


def test_step_seconds_time_each_step_after_the_first_and_progress_still_reaches_the_callers() -> None:
    generator = PaintingGenerator()
    service, pb_utils = observed_service(generator, step_s=0.25)
    heard: list[tuple[int, int]] = []

    class Listening(Caller):
        def progress(self, steps_done: int, steps: int, elapsed_s: float) -> None:
            heard.append((steps_done, steps))

    service.execute([arrays(seed=1, steps=4)], [Listening()])
    assert heard == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert pb_utils.MetricFamily.observed(metrics.STEP_SECONDS) == [0.25, 0.25, 0.25]
    (call_seconds,) = pb_utils.MetricFamily.observed(metrics.CALL_SECONDS)
    assert call_seconds > 0


def test_two_instances_of_a_model_add_to_one_series_and_two_models_keep_theirs_apart() -> None:
    pb_utils = FakePbUtils()
    first, second = ModelMetrics(pb_utils, "sd15", "1"), ModelMetrics(pb_utils, "sd15", "1")
    other = ModelMetrics(pb_utils, "flux", "1")
    image = GeneratedImage(np.zeros((8, 8, 3), np.uint8), 1)
    first.pipeline_call_ended([image, image], 1.0)
    second.pipeline_call_ended([image], 1.0)
    other.request_ended_before_pipeline(InvalidRequestError("WIDTH", 100, "rule"))
    assert pb_utils.MetricFamily.counts("sd15") == no_counts(images=3)
    assert pb_utils.MetricFamily.counts("flux") == no_counts(invalid_request=1)


def test_a_metric_that_triton_refuses_is_logged_and_the_request_still_gets_its_image(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service, pb_utils = observed_service(PaintingGenerator())
    family = pb_utils.MetricFamily.families[metrics.IMAGES]
    family.kind = "HISTOGRAM"  # every increment of the images counter now fails, as a refused IPC would
    with caplog.at_level(logging.ERROR, logger="diffusers_backend.metrics"):
        (outcome,) = service.execute([arrays(seed=1)], [Caller()])
    assert isinstance(outcome, GeneratedImage)
    assert "sd15: a metric update failed" in caplog.text
    assert pb_utils.MetricFamily.value(metrics.STEPS) == 4


def test_close_lets_go_of_every_metric_and_then_of_the_families() -> None:
    pb_utils = FakePbUtils()
    model_metrics = ModelMetrics(pb_utils, "sd15", "1")
    families = pb_utils.MetricFamily.families.values()
    assert sum(family.live_metrics for family in families) == 9  # images, 4 error kinds, steps, 3 histograms
    model_metrics.close()
    assert [family.live_metrics for family in families] == [0] * 6
    assert vars(model_metrics).get("_families") == {}


def test_a_service_without_an_observer_passes_the_callers_step_callback_unchanged() -> None:
    generator = PaintingGenerator()
    service = DiffusersService(generator, RequestLimits.for_model(SD15_TRAITS, ModelSettings("m")), "m")
    service.execute([arrays(seed=1)])
    assert generator.step_callbacks == [None]  # no callers, no metrics: the pipeline gets no step callback
