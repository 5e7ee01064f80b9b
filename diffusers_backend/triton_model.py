"""The Triton Python-backend model shared by every family: translation between ``pb_utils`` and the service.

``model_repository/<model>/1/model.py`` exposes :class:`DiffusersTritonModel` as ``TritonPythonModel``. The
module ``triton_python_backend_utils`` exists only inside Triton's Python stub, so it is imported when Triton
calls :meth:`DiffusersTritonModel.initialize`; unit tests put a fake one in ``sys.modules`` first.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .cpu_sharing import CoreSharing, available_cores
from .errors import DiffusersBackendError, GenerationError, InvalidRequestError, RequestCancelledError
from .loading import Placement
from .metrics import ModelMetrics
from .service import DiffusersService, GeneratedImage, Outcome
from .settings import ModelSettings

# The streaming variant's progress outputs (inference_client/contract.py names them for clients).
STEPS_DONE, STEPS, ELAPSED_S = "STEPS_DONE", "STEPS", "ELAPSED_S"

logger = logging.getLogger(__name__)

LOG_LEVEL_VARIABLE = "DIFFUSERS_BACKEND_LOG_LEVEL"


class DiffusersTritonModel:
    """``TritonPythonModel`` for any diffusers text-to-image pipeline; the family comes from the weights."""

    service: DiffusersService
    input_names: list[str]

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb_utils: Any = pb_utils
        _configure_logging()
        model_name = args["model_name"]
        config = json.loads(args["model_config"])
        self.input_names = [spec["name"] for spec in config["input"]]
        self.decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled", False))
        placement = Placement(args["model_instance_kind"], int(args["model_instance_device_id"]))
        self.core_sharing: CoreSharing | None = None
        try:
            settings = ModelSettings.from_parameters(config.get("parameters", {}))
            self.core_sharing = _core_sharing(model_name, placement, settings)
            self.service = DiffusersService.load(settings, placement, Path(args["model_repository"]),
                                                 self.core_sharing)
        except DiffusersBackendError as error:
            # Triton prints this under the model's name and, with --exit-on-error, stops the server.
            raise RuntimeError(f"Triton model {model_name!r} failed to load: {error}") from error
        self.metrics = _model_metrics(pb_utils, model_name, args.get("model_version", "1"))
        if self.metrics is not None:
            self.service.observer = self.metrics
        logger.info("%s ready as %r on %s", model_name, settings.model_id, placement.torch_device)

    def execute(self, requests: list[Any]) -> list[Any] | None:
        batch = [self._input_arrays(request) for request in requests]
        if not self.decoupled:
            callers = [TritonCaller(request) for request in requests]
            return [self._response(outcome) for outcome in self.service.execute(batch, callers)]
        # Decoupled (streaming): a progress response after every denoising step, then the final one; each
        # request must get its final response whatever happens, or its caller waits forever.
        callers = [TritonCaller(request, request.get_response_sender(), self.pb_utils) for request in requests]
        try:
            outcomes: list[Outcome] = self.service.execute(batch, callers)
        except Exception as error:
            logger.exception("%s: execute failed", self.service.model_id)
            outcomes = [GenerationError(f"the model failed: {type(error).__name__}: {error}")] * len(requests)
        for caller, outcome in zip(callers, outcomes, strict=True):
            try:
                caller.finish(self._response(outcome))
            except Exception:  # one caller gone wrong must not leave the others without their final response
                logger.exception("%s: a final response could not be sent", self.service.model_id)
        return None

    def finalize(self) -> None:
        logger.info("%s unloading", self.service.model_id)
        del self.service
        if self.core_sharing is not None:
            self.core_sharing.close()
        if self.metrics is not None:
            self.metrics.close()

    def _input_arrays(self, request: Any) -> dict[str, np.ndarray]:
        arrays = {}
        for name in self.input_names:
            tensor = self.pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                arrays[name] = tensor.as_numpy()
        return arrays

    def _response(self, outcome: Outcome) -> Any:
        pb_utils = self.pb_utils
        if isinstance(outcome, GeneratedImage):
            return pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("IMAGE", outcome.image[np.newaxis]),
                pb_utils.Tensor("SEED", np.array([[outcome.seed]], dtype=np.int64)),
            ])
        if isinstance(outcome, InvalidRequestError):
            code = pb_utils.TritonError.INVALID_ARG
        elif isinstance(outcome, RequestCancelledError):
            code = pb_utils.TritonError.CANCELLED
        else:
            code = pb_utils.TritonError.INTERNAL
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(outcome), code))


class TritonCaller:
    """The caller of one Triton request, as the service sees it (:class:`.service.Caller`)."""

    def __init__(self, request: Any, sender: Any = None, pb_utils: Any = None) -> None:
        self.request = request
        self.sender = sender
        """The response sender of a decoupled model's request; None for a model that answers once."""
        self.pb_utils = pb_utils

    def is_cancelled(self) -> bool:
        # Triton marks a request cancelled when its gRPC caller cancels the call (HTTP has no such signal).
        return bool(self.request.is_cancelled())

    def progress(self, steps_done: int, steps: int, elapsed_s: float) -> None:
        if self.sender is None:
            return
        pb_utils = self.pb_utils
        self.sender.send(pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(STEPS_DONE, np.array([[steps_done]], dtype=np.int32)),
            pb_utils.Tensor(STEPS, np.array([[steps]], dtype=np.int32)),
            pb_utils.Tensor(ELAPSED_S, np.array([[elapsed_s]], dtype=np.float32)),
        ]))

    def finish(self, response: Any) -> None:
        self.sender.send(response, flags=self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _core_sharing(model_name: str, placement: Placement, settings: ModelSettings) -> CoreSharing | None:
    if placement.on_gpu or not settings.share_cpu_cores:
        return None
    cores = settings.cpu_threads or available_cores()
    sharing = CoreSharing.for_instance(cores, _set_torch_threads)
    if sharing is not None:
        logger.info("%s: shares %d cores with the server's other CPU instances (%s)", model_name, cores,
                    sharing.group)
    return sharing


def _model_metrics(pb_utils: Any, model_name: str, model_version: str) -> ModelMetrics | None:
    # A model that cannot count (Triton refused a metric family) still serves: metrics are not worth an outage.
    try:
        return ModelMetrics(pb_utils, model_name, model_version)
    except Exception:
        logger.exception("%s: serving without its diffusers_* metrics", model_name)
        return None


def _set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _configure_logging() -> None:
    # The stub's stderr is the server's log; Triton configures no Python logging of its own.
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    logging.getLogger("diffusers_backend").setLevel(os.environ.get(LOG_LEVEL_VARIABLE, "INFO").upper())
