"""The Triton tensor contract of every text-to-image model (docs/contract.md), and the limits both sides share.

Pure data: numpy only, so the model side (``diffusers_backend``) can take its limits from here too. The
tritonclient objects for these tensors are built in :mod:`.triton`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

PROMPT = "PROMPT"
NEGATIVE_PROMPT = "NEGATIVE_PROMPT"
WIDTH = "WIDTH"
HEIGHT = "HEIGHT"
NUM_INFERENCE_STEPS = "NUM_INFERENCE_STEPS"
GUIDANCE_SCALE = "GUIDANCE_SCALE"
SEED = "SEED"
IMAGE = "IMAGE"

OUTPUT_NAMES = (IMAGE, SEED)
# A streaming (decoupled) variant sends one response of these after every denoising step, then the image.
STEPS_DONE = "STEPS_DONE"
STEPS = "STEPS"
ELAPSED_S = "ELAPSED_S"
PROGRESS_NAMES = (STEPS_DONE, STEPS, ELAPSED_S)

MAX_SEED = 2**63 - 1
"""Largest seed accepted: the SEED tensor is INT64 and torch seeds are unsigned."""
DEFAULT_MAX_PROMPT_BYTES = 4096
"""Longest prompt a model accepts by default, in UTF-8 bytes; the capability layer applies the same bound."""

_MAX_SHOWN_CHARS = 48


def describe_value(value: object) -> str:
    """A short, safe rendering of a received value for an error message (long prompts are cut)."""
    text = repr(value)
    if len(text) > _MAX_SHOWN_CHARS:
        return f"{text[:_MAX_SHOWN_CHARS]}…({len(text)} chars)"
    return text


@dataclass(frozen=True)
class TextToImage:
    """One request. Every field but the prompt is optional: None leaves it to the model's defaults."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """Input name → array with the batch dimension ([1, 1]), only for the fields that are set."""
        arrays = {PROMPT: np.array([[self.prompt.encode("utf-8")]], dtype=np.object_)}
        if self.negative_prompt is not None:
            arrays[NEGATIVE_PROMPT] = np.array([[self.negative_prompt.encode("utf-8")]], dtype=np.object_)
        for name, value, dtype in (
            (WIDTH, self.width, np.int32),
            (HEIGHT, self.height, np.int32),
            (NUM_INFERENCE_STEPS, self.num_inference_steps, np.int32),
            (GUIDANCE_SCALE, self.guidance_scale, np.float32),
            (SEED, self.seed, np.int64),
        ):
            if value is not None:
                arrays[name] = np.array([[value]], dtype=dtype)
        return arrays


@dataclass(frozen=True)
class GeneratedImage:
    image: np.ndarray
    """uint8 [H, W, 3] RGB."""
    seed: int


@dataclass(frozen=True)
class Progress:
    """Where a streaming generation is: ``steps_done`` of ``steps`` denoising steps, ``elapsed_s`` seconds in."""

    steps_done: int
    steps: int
    elapsed_s: float


def read_result(result: Any) -> GeneratedImage:
    """The image of one response (a tritonclient ``InferResult``, HTTP or gRPC), without the batch dimension."""
    return GeneratedImage(image=result.as_numpy(IMAGE)[0], seed=int(result.as_numpy(SEED).reshape(-1)[0]))


def read_progress(result: Any) -> Progress:
    """The progress report of one streaming response (a tritonclient ``InferResult``)."""
    return Progress(steps_done=int(result.as_numpy(STEPS_DONE).reshape(-1)[0]),
                    steps=int(result.as_numpy(STEPS).reshape(-1)[0]),
                    elapsed_s=float(result.as_numpy(ELAPSED_S).reshape(-1)[0]))
