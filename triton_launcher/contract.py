"""The client side of the Triton tensor contract shared by every model (see README.md, "Triton contract").

Builds the input tensors of one text-to-image request for ``tritonclient.http`` and reads its outputs. Omitted
options are not sent, so the model's own defaults apply.
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

    def http_inputs(self) -> list[Any]:
        """``tritonclient.http.InferInput`` objects, binary-encoded."""
        from tritonclient.http import InferInput
        from tritonclient.utils import np_to_triton_dtype

        inputs = []
        for name, array in self.arrays().items():
            tensor = InferInput(name, list(array.shape), "BYTES" if array.dtype == np.object_
                                else np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array, binary_data=True)
            inputs.append(tensor)
        return inputs


def http_outputs() -> list[Any]:
    from tritonclient.http import InferRequestedOutput

    return [InferRequestedOutput(name, binary_data=True) for name in OUTPUT_NAMES]


@dataclass(frozen=True)
class GeneratedImage:
    image: np.ndarray
    """uint8 [H, W, 3] RGB."""
    seed: int


def read_result(result: Any) -> GeneratedImage:
    """Outputs of one response (``tritonclient`` ``InferResult``) without the batch dimension."""
    return GeneratedImage(image=result.as_numpy(IMAGE)[0], seed=int(result.as_numpy(SEED).reshape(-1)[0]))
