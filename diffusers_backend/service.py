"""One served model without Triton: a batch of raw requests in, one outcome per request out.

:class:`DiffusersService` is what every ``model.py`` drives through :mod:`.triton_model`; tests and benchmarks
drive it directly. A bad request fails alone; a failed pipeline call fails its group alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from .batching import group_requests
from .cpu_sharing import CoreSharing
from .errors import DiffusersBackendError, GenerationError, InvalidRequestError, ModelLoadError, RequestCancelledError
from .settings import ModelSettings
from .validation import GenerationRequest, RequestLimits, parse_request

logger = logging.getLogger(__name__)

ErrorOutcome = TypeVar("ErrorOutcome", bound=DiffusersBackendError)

WARM_UP_SIDE = 64
"""Side of the warm-up image: a multiple of every family's size multiple, cheap on any device."""


@dataclass(frozen=True)
class GeneratedImage:
    image: np.ndarray
    """uint8, [H, W, 3], RGB."""
    seed: int
    """The seed the image was generated with: sending it back reproduces the image."""


Outcome = GeneratedImage | DiffusersBackendError


class ImageGenerator(Protocol):
    def generate(self, group: Sequence[GenerationRequest], stop_requested: Callable[[], bool] | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> list[np.ndarray | InvalidRequestError]: ...


class Caller(Protocol):
    """Whoever waits for one request: whether they have gone away, and where its progress goes."""

    def is_cancelled(self) -> bool: ...

    def progress(self, steps_done: int, steps: int, elapsed_s: float) -> None: ...


StepCallback = Callable[[int, int], None]
"""``on_step(steps_done, steps)``, called after every denoising step."""


class ExecutionObserver(Protocol):
    """Hears how each request ends and what each pipeline call does (:mod:`.metrics` counts it)."""

    def request_ended_before_pipeline(self, error: DiffusersBackendError) -> None: ...

    def pipeline_call_started(self, requests: int, on_step: StepCallback | None) -> StepCallback | None:
        """The ``on_step`` to give the call: ``on_step`` itself, or one that also hears of every step."""

    def pipeline_call_ended(self, results: Sequence[Outcome], duration_s: float) -> None: ...


class Unobserved:
    """The observer of a service nobody watches."""

    def request_ended_before_pipeline(self, error: DiffusersBackendError) -> None:
        pass

    def pipeline_call_started(self, requests: int, on_step: StepCallback | None) -> StepCallback | None:
        return on_step

    def pipeline_call_ended(self, results: Sequence[Outcome], duration_s: float) -> None:
        pass


class DiffusersService:
    def __init__(self, generator: ImageGenerator, limits: RequestLimits, model_id: str) -> None:
        self.generator = generator
        self.limits = limits
        self.model_id = model_id
        self.observer: ExecutionObserver = Unobserved()
        """Set by the Triton model to its metrics (:class:`.metrics.ModelMetrics`)."""

    @classmethod
    def load(cls, settings: ModelSettings, placement: Any, model_directory: Path | None = None,
             core_sharing: CoreSharing | None = None) -> DiffusersService:
        """Load the configured pipeline onto ``placement`` (a :class:`.loading.Placement`); ``core_sharing``:
        this CPU instance's share of the cores, when the model has several."""
        from .engine import DiffusionEngine
        from .loading import load_pipeline, locate_pipeline

        folder, traits = locate_pipeline(settings, model_directory)
        limits = RequestLimits.for_model(traits, settings)  # a bad setting fails here, before minutes of loading
        pipeline = load_pipeline(settings, placement, folder, traits)
        service = cls(DiffusionEngine(pipeline, traits, settings, core_sharing), limits, settings.model_id)
        service.warm_up()
        return service

    def warm_up(self) -> None:
        """One small generation at load: the first user request should not pay for lazy initialisation
        (kernel selection, allocator growth, tokenizer caches), and weights that cannot generate fail the
        load instead of the first request."""
        side = max(WARM_UP_SIDE, self.limits.size_multiple)
        request = GenerationRequest(prompt="warm-up", negative_prompt=None, width=side, height=side, steps=1,
                                    guidance_scale=self.limits.default_guidance_scale, seed=0)
        started = time.perf_counter()
        try:
            self.generator.generate([request])
        except Exception as error:
            raise ModelLoadError(f"model {self.model_id!r} loaded but cannot generate: {error}") from error
        logger.info("%s: warm-up generation took %.3f s", self.model_id, time.perf_counter() - started)

    def execute(self, batch: Sequence[Mapping[str, np.ndarray]],
                callers: Sequence[Caller] | None = None) -> list[Outcome]:
        """One outcome per request of ``batch`` (input name → array), in order.

        ``callers[i]`` waits for request i: it hears of every denoising step, and says whether it has gone
        away. A request cancelled before its group starts is not generated; a group stops after the step at
        which all of its callers are gone (while one is left, the others' images cost nothing extra: they
        share the batch).
        """
        started = time.perf_counter()
        outcomes: list[Outcome | None] = [None] * len(batch)
        parsed: list[GenerationRequest] = []
        positions: list[int] = []
        for position, tensors in enumerate(batch):
            try:
                parsed.append(parse_request(tensors, self.limits))
                positions.append(position)
            except InvalidRequestError as error:
                logger.info("%s: request refused: %s %s", self.model_id, error.field, error.rule)
                outcomes[position] = _without_tracebacks(error)
                self.observer.request_ended_before_pipeline(error)

        groups = group_requests(parsed)
        calls = 0
        for whole_group in groups:
            group = whole_group
            stop_requested = on_step = None
            if callers is not None:
                group = [index for index in whole_group if not callers[positions[index]].is_cancelled()]
                for index in set(whole_group) - set(group):
                    outcomes[positions[index]] = self._cancelled_before_start()
                if not group:
                    continue
                waiting = [callers[positions[index]] for index in group]
                stop_requested = partial(_all_cancelled, waiting)
                on_step = partial(_report_step, waiting, time.perf_counter())
            requests = [parsed[index] for index in group]
            calls += 1
            call_started = time.perf_counter()
            observed_on_step = self.observer.pipeline_call_started(len(requests), on_step)
            try:
                images = self.generator.generate(requests, stop_requested, observed_on_step)
            except RequestCancelledError as error:
                logger.info("%s: %d request(s) %s", self.model_id, len(group), error)
                results: list[Outcome] = [_without_tracebacks(error)] * len(group)
            except GenerationError as error:
                logger.error("%s: generation failed for %d request(s): %s", self.model_id, len(group), error)
                results = [_without_tracebacks(error)] * len(group)
            except Exception as error:  # one failing call must not take the others down
                logger.exception("%s: pipeline call failed for %d request(s)", self.model_id, len(group))
                failure = GenerationError(f"the pipeline failed: {type(error).__name__}: {error}")
                results = [failure] * len(group)
            else:
                results = [image if isinstance(image, InvalidRequestError) else GeneratedImage(image, request.seed)
                           for image, request in zip(images, requests, strict=True)]
            for index, result in zip(group, results, strict=True):
                outcomes[positions[index]] = result
            self.observer.pipeline_call_ended(results, time.perf_counter() - call_started)

        logger.info(
            "%s: %d request(s), %d refused, %d pipeline call(s), %.3f s",
            self.model_id, len(batch), len(batch) - len(parsed), calls, time.perf_counter() - started,
        )
        missing = [position for position, outcome in enumerate(outcomes) if outcome is None]
        if missing:  # would misalign responses and requests: fail loudly instead
            raise RuntimeError(f"no outcome for request positions {missing}")
        return [outcome for outcome in outcomes if outcome is not None]

    def _cancelled_before_start(self) -> RequestCancelledError:
        cancelled = RequestCancelledError("cancelled by the caller before it started")
        self.observer.request_ended_before_pipeline(cancelled)
        return cancelled


def _without_tracebacks(error: ErrorOutcome) -> ErrorOutcome:
    """``error``, and the errors it was raised from, with their tracebacks dropped, to be kept as an outcome.

    A caught error kept in this frame's ``outcomes`` is a reference cycle (its traceback holds the frame), which
    only the cyclic garbage collector breaks; until it runs, the frames of ``parse_request`` or of the pipeline
    keep what they held alive: a refused multi-megabyte prompt, a cancelled batch's latents. The messages are
    all a response needs, and anything worth a traceback was logged with one.
    """
    cause: BaseException | None = error
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        cause.__traceback__ = None
        cause = cause.__cause__ or cause.__context__
    return error


def _all_cancelled(callers: Sequence[Caller]) -> bool:
    return all(caller.is_cancelled() for caller in callers)


def _report_step(callers: Sequence[Caller], started: float, steps_done: int, steps: int) -> None:
    elapsed = time.perf_counter() - started
    for caller in callers:
        caller.progress(steps_done, steps, elapsed)
