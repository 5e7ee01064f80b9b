"""Prometheus metrics of one served model, through the Python backend's custom metrics.

Triton (2.51 here) lets a Python model register metric families (``pb_utils.MetricFamily``, kinds COUNTER,
GAUGE and HISTOGRAM) and shows them on its own metrics endpoint (``/metrics``, on 127.0.0.1, see
``triton_launcher/server.py``) next to its ``nv_*`` metrics. :class:`ModelMetrics` is the
:class:`.service.ExecutionObserver` that turns what the service does into them; ``pb_utils`` is passed in, so
the unit tests give it a fake one. docs/metrics.md lists the metrics with example queries.

Every series carries the labels ``model`` and ``version``, as Triton's own do, so the two can be joined. The
instances of one model (each its own stub process) register the same families and labels: Triton keeps one
series for them, which all of them add to.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .errors import DiffusersBackendError, GenerationError, InvalidRequestError, RequestCancelledError
from .service import GeneratedImage, Outcome, StepCallback

logger = logging.getLogger(__name__)

PREFIX = "diffusers_"

IMAGES = PREFIX + "images_total"
ERRORS = PREFIX + "request_errors_total"
STEPS = PREFIX + "denoising_steps_total"
STEP_SECONDS = PREFIX + "denoising_step_seconds"
CALL_SECONDS = PREFIX + "pipeline_call_seconds"
BATCH_SIZE = PREFIX + "pipeline_batch_size"

INVALID_REQUEST = "invalid_request"
"""The request broke a rule of the contract and was refused before any work (Triton INVALID_ARG)."""
SAFETY_CHECKER = "safety_checker"
"""The pipeline made the image, its safety checker flagged it, and it was withheld (INVALID_ARG)."""
GENERATION_ERROR = "generation_error"
"""The pipeline call failed (out of memory, non-finite pixels, a bug): INTERNAL for each of its requests."""
CANCELLED = "cancelled"
"""The caller went away, before its group started or while it ran (CANCELLED)."""
ERROR_KINDS = (INVALID_REQUEST, SAFETY_CHECKER, GENERATION_ERROR, CANCELLED)

# Seconds per denoising step: a tiny model on a CPU takes milliseconds, FLUX at 1024² on a CPU minutes.
STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                        120.0)
# Seconds per pipeline call (prompt encoding, every step, decoding): up to the 5-minute queue timeout and past it.
CALL_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                        1800.0)
# Requests per pipeline call: every integer up to the models' max_batch_size of 4, then coarser.
BATCH_SIZE_BUCKETS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0)

_HELP = {
    IMAGES: "Images generated and returned, per model.",
    ERRORS: "Requests answered with an error, per model and kind (invalid_request, safety_checker, "
            "generation_error, cancelled).",
    STEPS: "Denoising steps run by the scheduler (all requests of a pipeline call share each step), per model.",
    STEP_SECONDS: "Seconds from the end of one denoising step to the end of the next (the first step of a call, "
                  "which includes prompt encoding, is not observed), per model.",
    CALL_SECONDS: "Seconds per pipeline call: prompt encoding, every denoising step and decoding, per model.",
    BATCH_SIZE: "Requests that ran together in one pipeline call, per model.",
}


def error_kind(error: DiffusersBackendError, *, from_pipeline: bool) -> str:
    """The ``kind`` label of a request's error; ``from_pipeline``: the pipeline call returned or raised it
    (an InvalidRequestError from there is the safety checker's verdict, not a broken rule)."""
    if isinstance(error, RequestCancelledError):
        return CANCELLED
    if isinstance(error, InvalidRequestError):
        return SAFETY_CHECKER if from_pipeline else INVALID_REQUEST
    if isinstance(error, GenerationError) or from_pipeline:
        return GENERATION_ERROR
    raise ValueError(f"{type(error).__name__} is not the error of a request: {error}")


class ModelMetrics:
    """The metrics of one Triton model instance: counts what :class:`.service.DiffusersService` reports.

    ``pb_utils``: ``triton_python_backend_utils`` (or a stand-in with the same ``MetricFamily``). Call
    :meth:`close` when the instance unloads: Triton wants a family's metrics deleted before the family.
    """

    def __init__(self, pb_utils: Any, model_name: str, model_version: str,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.model_name = model_name
        labels = {"model": model_name, "version": model_version}
        family_kind = pb_utils.MetricFamily
        self._families = {
            name: family_kind(name=name, description=_HELP[name], kind=kind)
            for name, kind in ((IMAGES, family_kind.COUNTER), (ERRORS, family_kind.COUNTER),
                               (STEPS, family_kind.COUNTER), (STEP_SECONDS, family_kind.HISTOGRAM),
                               (CALL_SECONDS, family_kind.HISTOGRAM), (BATCH_SIZE, family_kind.HISTOGRAM))
        }
        self._images = self._families[IMAGES].Metric(labels=labels)
        # Every kind from the start, at 0: a series that appears only at its first error defeats rate().
        self._errors = {kind: self._families[ERRORS].Metric(labels={**labels, "kind": kind}) for kind in ERROR_KINDS}
        self._steps = self._families[STEPS].Metric(labels=labels)
        self._step_seconds = self._families[STEP_SECONDS].Metric(labels=labels, buckets=list(STEP_SECONDS_BUCKETS))
        self._call_seconds = self._families[CALL_SECONDS].Metric(labels=labels, buckets=list(CALL_SECONDS_BUCKETS))
        self._batch_size = self._families[BATCH_SIZE].Metric(labels=labels, buckets=list(BATCH_SIZE_BUCKETS))

    # --- service.ExecutionObserver ----------------------------------------------------------------------------

    def request_ended_before_pipeline(self, error: DiffusersBackendError) -> None:
        with self._never_failing():
            self._errors[error_kind(error, from_pipeline=False)].increment(1)

    def pipeline_call_started(self, requests: int, on_step: StepCallback | None) -> StepCallback:
        with self._never_failing():
            self._batch_size.observe(float(requests))
        previous_step_end: float | None = None

        def counting_step(steps_done: int, steps: int) -> None:
            nonlocal previous_step_end
            now = self.clock()
            with self._never_failing():
                self._steps.increment(1)
                if previous_step_end is not None:
                    self._step_seconds.observe(now - previous_step_end)
            previous_step_end = now
            if on_step is not None:
                on_step(steps_done, steps)

        return counting_step

    def pipeline_call_ended(self, results: Sequence[Outcome], duration_s: float) -> None:
        with self._never_failing():
            self._call_seconds.observe(duration_s)
            images = sum(isinstance(result, GeneratedImage) for result in results)
            if images:
                self._images.increment(images)
            for result in results:
                if not isinstance(result, GeneratedImage):
                    self._errors[error_kind(result, from_pipeline=True)].increment(1)

    @contextmanager
    def _never_failing(self) -> Iterator[None]:
        # A metric that cannot be updated (Triton refused it) is logged; the request it describes goes on.
        try:
            yield
        except Exception:
            logger.exception("%s: a metric update failed", self.model_name)

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the metrics, then their families (the order Triton requires)."""
        del self._images, self._errors, self._steps, self._step_seconds, self._call_seconds, self._batch_size
        self._families.clear()
