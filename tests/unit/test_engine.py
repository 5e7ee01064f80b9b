"""The service with real tiny pipelines loaded in-process by the same code Triton runs (needs torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from diffusers_backend.engine import DiffusionEngine, to_uint8_images  # noqa: E402
from diffusers_backend.errors import (  # noqa: E402
    GenerationError,
    InvalidRequestError,
    ModelLoadError,
    RequestCancelledError,
)
from diffusers_backend.families import inspect_pipeline  # noqa: E402
from diffusers_backend.loading import Placement, resolve_pipeline_folder  # noqa: E402
from diffusers_backend.service import DiffusersService, GeneratedImage  # noqa: E402
from diffusers_backend.settings import ModelSettings  # noqa: E402
from diffusers_backend.tiny import build_tiny_models  # noqa: E402
from diffusers_backend.validation import GenerationRequest  # noqa: E402
from inference_client.contract import TextToImage  # noqa: E402
from triton_launcher.paths import TINY_PIPELINES  # noqa: E402

CPU = Placement("CPU")


@pytest.fixture(scope="module")
def tiny_folders() -> dict[str, Path]:
    return build_tiny_models(TINY_PIPELINES)


def load(folder: Path, **settings: Any) -> DiffusersService:
    return DiffusersService.load(ModelSettings("tiny", model_source=str(folder), **settings), CPU)


def arrays(**fields: Any) -> dict[str, np.ndarray]:
    fields.setdefault("num_inference_steps", 2)
    return TextToImage(**fields).arrays()


def test_service_answers_a_mixed_batch_in_order_when_loaded_from_a_tiny_folder(tiny_folders: dict[str, Path]) -> None:
    service = load(tiny_folders["sd15"])
    outcomes = service.execute([
        arrays(prompt="a", width=64, height=64, seed=1),
        arrays(prompt="b", width=128, height=64, seed=2),
        arrays(prompt="", seed=3),
        arrays(prompt="c", width=64, height=64, seed=4),
    ])
    assert isinstance(outcomes[2], InvalidRequestError)
    images = [outcome for outcome in outcomes if isinstance(outcome, GeneratedImage)]
    assert [image.image.shape for image in images] == [(64, 64, 3), (64, 128, 3), (64, 64, 3)]
    assert [image.seed for image in images] == [1, 2, 4]


def test_service_matches_a_solo_call_within_one_step_when_batched(tiny_folders: dict[str, Path]) -> None:
    service = load(tiny_folders["sdxl"])
    request = arrays(prompt="a red cube", width=64, height=64, seed=9)
    solo = service.execute([request])[0]
    batched = service.execute([arrays(prompt="other", width=64, height=64, seed=1), request])[1]
    assert isinstance(solo, GeneratedImage)
    assert isinstance(batched, GeneratedImage)
    assert np.abs(solo.image.astype(int) - batched.image.astype(int)).max() <= 1


def test_flux_negative_prompt_changes_the_image_when_true_cfg_is_enabled(tiny_folders: dict[str, Path]) -> None:
    service = load(tiny_folders["flux"], true_cfg_scale=4.0)
    plain, negative = service.execute([
        arrays(prompt="a red cube", width=64, height=64, seed=3),
        arrays(prompt="a red cube", negative_prompt="blue", width=64, height=64, seed=3),
    ])
    assert isinstance(plain, GeneratedImage)
    assert isinstance(negative, GeneratedImage)
    assert not np.array_equal(plain.image, negative.image)


def test_flux_is_guided_away_from_the_empty_prompt_when_true_cfg_is_enabled_and_no_negative_prompt_given(
    tiny_folders: dict[str, Path],
) -> None:
    request = arrays(prompt="a red cube", width=64, height=64, seed=3)
    (unguided,) = load(tiny_folders["flux"]).execute([request])
    (guided,) = load(tiny_folders["flux"], true_cfg_scale=4.0).execute([request])
    assert isinstance(unguided, GeneratedImage)
    assert isinstance(guided, GeneratedImage)
    assert not np.array_equal(unguided.image, guided.image)


def test_to_uint8_images_refuses_when_pixels_are_not_finite() -> None:
    images = torch.zeros(1, 3, 8, 8)
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(GenerationError, match="non-finite pixels"):
        to_uint8_images(images)


def test_to_uint8_images_rounds_like_diffusers_when_converting() -> None:
    images = torch.tensor([0.0, 0.5, 1.0, 1.2]).reshape(1, 1, 2, 2).expand(1, 3, 2, 2)
    (image,) = to_uint8_images(images)
    assert image.shape == (2, 2, 3)
    assert image[..., 0].tolist() == [[0, 128], [255, 255]]


def test_resolve_pipeline_folder_names_model_and_path_when_folder_is_not_a_pipeline(tmp_path: Path) -> None:
    settings = ModelSettings("my-model", model_source="./missing")
    with pytest.raises(ModelLoadError, match=r"model 'my-model': model_source './missing' resolves to .*missing"):
        resolve_pipeline_folder(settings, tmp_path)


def test_load_refuses_a_gpu_instance_when_torch_sees_no_cuda(tiny_folders: dict[str, Path]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    settings = ModelSettings("tiny", model_source=str(tiny_folders["sd15"]))
    with pytest.raises(ModelLoadError, match="instance kind GPU, but torch sees no CUDA device"):
        DiffusersService.load(settings, Placement("GPU"))


class FlaggingPipeline:
    """Stands in for a pipeline whose safety checker flags the second image of a call."""

    def __call__(self, **arguments: Any) -> Any:
        count = len(arguments["prompt"])
        images = torch.full((count, 3, arguments["height"], arguments["width"]), 0.5)
        return type("Output", (), {"images": images, "nsfw_content_detected": [False, True][:count]})()


def test_engine_refuses_the_flagged_request_alone_when_the_safety_checker_flags_an_image(
    tiny_folders: dict[str, Path],
) -> None:
    engine = DiffusionEngine(FlaggingPipeline(), inspect_pipeline(tiny_folders["sd15"]), ModelSettings("sd15"))
    service = DiffusersService(engine, load(tiny_folders["sd15"]).limits, "sd15")
    passed, flagged = service.execute([arrays(prompt=prompt, width=64, height=64) for prompt in ("a", "b")])
    assert isinstance(passed, GeneratedImage)
    assert isinstance(flagged, InvalidRequestError)
    assert "safety checker flagged" in str(flagged)


def test_channels_last_keeps_the_image_within_one_step_when_the_unet_and_vae_change_layout(
    tiny_folders: dict[str, Path],
) -> None:
    default, channels_last = load(tiny_folders["sd15"]), load(tiny_folders["sd15"], channels_last=True)
    unet = channels_last.generator.pipeline.unet  # type: ignore[attr-defined]
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    request = [arrays(prompt="a lighthouse", width=64, height=64, seed=3)]
    first, second = default.execute(request)[0], channels_last.execute(request)[0]
    assert isinstance(first, GeneratedImage)
    assert isinstance(second, GeneratedImage)
    assert np.abs(first.image.astype(np.int16) - second.image.astype(np.int16)).max() <= 1


def test_attention_backend_native_gives_the_default_image_when_set(tiny_folders: dict[str, Path]) -> None:
    default, native = load(tiny_folders["flux"]), load(tiny_folders["flux"], attention_backend="native")
    request = [arrays(prompt="a lighthouse", width=64, height=64, seed=3)]
    first, second = default.execute(request)[0], native.execute(request)[0]
    assert isinstance(first, GeneratedImage)
    assert isinstance(second, GeneratedImage)
    np.testing.assert_array_equal(first.image, second.image)


def test_load_names_the_parameter_when_the_attention_backend_is_unknown(tiny_folders: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="parameter attention_backend='warp-drive' cannot be used"):
        load(tiny_folders["sd3"], attention_backend="warp-drive")


def test_torch_compile_wraps_the_denoiser_with_the_configured_mode(
    tiny_folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    compiled: list[tuple[Any, str]] = []

    def fake_compile(module: Any, mode: str) -> Any:
        # Compiling for real takes minutes on these CPUs; the wiring is what is checked here.
        compiled.append((module, mode))
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    service = load(tiny_folders["sd3"], torch_compile="max-autotune")
    transformer = service.generator.pipeline.transformer  # type: ignore[attr-defined]
    assert compiled == [(transformer, "max-autotune")]


def test_engine_stops_after_the_step_at_which_the_callers_left_and_serves_on(tiny_folders: dict[str, Path]) -> None:
    engine = load(tiny_folders["sd15"]).generator
    assert isinstance(engine, DiffusionEngine)
    request = GenerationRequest(prompt="a cube", negative_prompt=None, width=64, height=64, steps=8,
                                guidance_scale=7.5, seed=3)
    questions: list[int] = []

    def gone_at_third_question() -> bool:
        questions.append(len(questions))
        return len(questions) >= 3

    steps_seen: list[tuple[int, int]] = []
    with pytest.raises(RequestCancelledError) as cancelled:
        engine.generate([request], gone_at_third_question, lambda done, steps: steps_seen.append((done, steps)))
    assert len(questions) == 3  # asked once per step, and nothing ran after
    # The scheduler's steps: SD1.5's PNDM makes one more denoiser pass than the 8 asked for.
    total = engine.pipeline.num_timesteps
    assert total in (8, 9)
    assert steps_seen == [(1, total), (2, total), (3, total)]
    assert str(cancelled.value) == f"cancelled by the caller after step 3 of {total}"
    image = engine.generate([request], lambda: False)[0]
    assert isinstance(image, np.ndarray)
    assert image.shape == (64, 64, 3)
