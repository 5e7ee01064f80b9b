"""Generation through the real tritonserver, for every family of tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import GUIDED_MODELS, TINY_MODELS, Generator


def max_difference(first: np.ndarray, second: np.ndarray) -> int:
    return int(np.abs(first.astype(np.int16) - second.astype(np.int16)).max())


@pytest.mark.parametrize("model", TINY_MODELS)
def test_image_has_the_requested_shape_and_uint8_type_when_size_is_not_square(
    generator: Generator, model: str
) -> None:
    generated = generator.generate(model, width=160, height=96, seed=1)
    assert generated.image.dtype == np.uint8
    assert generated.image.shape == (96, 160, 3)
    assert generated.image.std() > 0  # a picture, not a flat fill


@pytest.mark.parametrize("model", TINY_MODELS)
def test_same_seed_gives_a_bitwise_identical_image_when_sent_twice(generator: Generator, model: str) -> None:
    first = generator.generate(model, seed=1234)
    second = generator.generate(model, seed=1234)
    assert (first.seed, second.seed) == (1234, 1234)
    assert np.array_equal(first.image, second.image)


@pytest.mark.parametrize("model", TINY_MODELS)
def test_different_seeds_give_different_images_when_prompt_is_the_same(generator: Generator, model: str) -> None:
    assert max_difference(generator.generate(model, seed=1).image, generator.generate(model, seed=2).image) > 8


@pytest.mark.parametrize("model", TINY_MODELS)
def test_returned_seed_reproduces_the_image_when_request_was_unseeded(generator: Generator, model: str) -> None:
    unseeded = generator.generate(model)
    again = generator.generate(model, seed=unseeded.seed)
    assert np.array_equal(unseeded.image, again.image)


@pytest.mark.parametrize("model", GUIDED_MODELS)
def test_guidance_scale_changes_the_image_when_family_uses_guidance(generator: Generator, model: str) -> None:
    low = generator.generate(model, seed=5, guidance_scale=1.0)
    high = generator.generate(model, seed=5, guidance_scale=9.0)
    assert max_difference(low.image, high.image) > 8


@pytest.mark.parametrize("model", GUIDED_MODELS)
def test_negative_prompt_changes_the_image_when_family_uses_it(generator: Generator, model: str) -> None:
    plain = generator.generate(model, seed=5, guidance_scale=7.0)
    negative = generator.generate(model, seed=5, guidance_scale=7.0, negative_prompt="green, blurry, dark")
    assert max_difference(plain.image, negative.image) > 8


@pytest.mark.parametrize("model", TINY_MODELS)
def test_defaults_are_the_size_the_model_was_trained_at_when_options_are_omitted(
    generator: Generator, model: str
) -> None:
    generated = generator.generate(model, width=None, height=None, num_inference_steps=1)
    # The size the tiny models were trained at: UNet/SD3 sample_size x 8, and the tiny config's default_width
    # and default_height (which also replace FluxPipeline's fixed 1024).
    assert generated.image.shape == (128, 128, 3)


@pytest.mark.parametrize("model", TINY_MODELS)
def test_prompt_text_stays_out_of_the_server_log_when_the_model_truncates_it(
    generator: Generator, model: str
) -> None:
    # The tiny CLIP tokenizer has one token per character: this is far over its 77 tokens.
    generator.generate(model, prompt="a zebra " + "quokka " * 40, num_inference_steps=1)
    log_path = generator.server.log_path
    assert log_path is not None
    log = log_path.read_text(errors="replace")
    assert "was truncated" in log
    assert "quokka" not in log
