"""Pipeline calls: a group of compatible requests → one uint8 RGB image per request."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from typing import Any

import numpy as np
import torch

from .cpu_sharing import CoreSharing
from .errors import GenerationError, InvalidRequestError, RequestCancelledError
from .families import FLUX, SD3, PipelineTraits
from .settings import ModelSettings
from .validation import GenerationRequest


class DiffusionEngine:
    """Runs one loaded pipeline. Not thread-safe: Triton calls ``execute`` of an instance one batch at a time."""

    def __init__(self, pipeline: Any, traits: PipelineTraits, settings: ModelSettings,
                 core_sharing: CoreSharing | None = None) -> None:
        self.pipeline = pipeline
        self.traits = traits
        self.settings = settings
        self.max_sequence_length = settings.max_sequence_length or traits.max_sequence_length
        self.core_sharing = core_sharing

    def generate(self, group: Sequence[GenerationRequest], stop_requested: Callable[[], bool] | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> list[np.ndarray | InvalidRequestError]:
        """Images (uint8, [H, W, 3]) for requests that share size, steps, guidance and negative-prompt use.

        An image the pipeline's own safety checker flagged (SD1.5 weights ship one; it blacks the image out)
        comes back as an error for that request instead of a black picture. After every denoising step,
        ``on_step(steps_done, steps)`` hears of it, then ``stop_requested`` is asked; when it says yes (every
        caller of the group went away), the call stops there and raises RequestCancelledError.
        """
        first = group[0]
        if any(request.group_key != first.group_key for request in group):
            raise ValueError("generate() takes only requests with one group_key; split them with group_requests")
        # One generator per request, on the CPU: a request's initial noise depends on its seed alone, whatever
        # else shares the call, and is the same on every device type.
        generators = [torch.Generator(device="cpu").manual_seed(request.seed) for request in group]
        arguments: dict[str, Any] = {
            "prompt": [request.prompt for request in group],
            "width": first.width,
            "height": first.height,
            "num_inference_steps": first.steps,
            "guidance_scale": first.guidance_scale,
            "generator": generators,
            "output_type": "pt",
        }
        if first.negative_prompt is not None:
            arguments["negative_prompt"] = [request.negative_prompt for request in group]
        family = self.traits.family
        if family in (SD3, FLUX) and self.max_sequence_length is not None:
            arguments["max_sequence_length"] = self.max_sequence_length
        if family is FLUX and self.settings.true_cfg_scale > 1:
            # FluxPipeline guides only when it has a negative prompt; with true CFG enabled every request is
            # guided, away from the empty prompt when it names nothing to avoid (as the SD pipelines do).
            arguments["true_cfg_scale"] = self.settings.true_cfg_scale
            arguments["negative_prompt"] = [request.negative_prompt or "" for request in group]
        if self.core_sharing is not None or stop_requested is not None or on_step is not None:
            arguments["callback_on_step_end"] = partial(self._after_step, steps=first.steps,
                                                        stop_requested=stop_requested, on_step=on_step)
        try:
            with torch.inference_mode(), self._sharing_cores():
                output = self.pipeline(**arguments)
                images = to_uint8_images(output.images)  # still holding this instance's cores
        except _StopGenerating as stop:
            raise RequestCancelledError(
                f"cancelled by the caller after step {stop.steps_done} of {stop.steps}") from None
        except torch.cuda.OutOfMemoryError as error:
            raise GenerationError(
                f"out of GPU memory generating {len(group)} image(s) of {first.width}x{first.height}; "
                "retry smaller, or lower max_batch_size in config.pbtxt"
            ) from error
        flagged = getattr(output, "nsfw_content_detected", None) or [False] * len(group)
        return [
            InvalidRequestError(
                "PROMPT", request.prompt,
                "the model's safety checker flagged the generated image, which is withheld; change the prompt",
            ) if is_flagged else image
            for image, request, is_flagged in zip(images, group, flagged, strict=True)
        ]

    def _sharing_cores(self) -> Any:
        return self.core_sharing.generating() if self.core_sharing is not None else nullcontext()

    def _after_step(self, pipeline: Any, step: int, _timestep: Any, tensors: dict[str, Any], *, steps: int,
                    stop_requested: Callable[[], bool] | None,
                    on_step: Callable[[int, int], None] | None) -> dict[str, Any]:
        # diffusers' callback_on_step_end: runs after each denoising step and must hand the tensors back.
        # Steps are the scheduler's: SD1.5's default PNDM makes one more denoiser pass than it was asked for.
        total = getattr(pipeline, "num_timesteps", None) or steps
        if on_step is not None:
            on_step(step + 1, total)
        # Raising is the only way out of the denoising loop: the pipeline's `interrupt` flag would skip the
        # remaining steps but still decode the latents, the VAE's share of the work.
        if stop_requested is not None and stop_requested():
            raise _StopGenerating(step + 1, total)
        if self.core_sharing is not None:
            self.core_sharing.rebalance()
        return tensors


class _StopGenerating(Exception):  # noqa: N818 - a signal through the pipeline's loop, not an error
    def __init__(self, steps_done: int, steps: int) -> None:
        super().__init__(steps_done, steps)
        self.steps_done = steps_done
        self.steps = steps


def to_uint8_images(images: torch.Tensor) -> list[np.ndarray]:
    """Pipeline output ([N, 3, H, W] floats in [0, 1]) → N arrays [H, W, 3] uint8, rounded as diffusers does."""
    # In float32 even for half-precision pipelines: 255 * x in float16 is off by up to one step.
    images = images.float()
    if not bool(torch.isfinite(images).all()):
        raise GenerationError(
            "the pipeline produced non-finite pixels (a float16 overflow, often in the VAE); "
            "set dtype_gpu to bfloat16 or float32 in config.pbtxt"
        )
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [np.ascontiguousarray(image) for image in pixels]
