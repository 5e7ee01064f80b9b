"""The prompt reaches the image: the trained tiny models, through the real server, draw what the caption asks.

Each test would fail if a part of the prompt path broke: the prompt not reaching the text encoder, the negative
prompt swapped in or ignored, guidance wired backwards, one of SDXL's, SD3's or FLUX's text encoders dropped.
The judge is workbench/shapes.py's classifier, which sees only the pixels. The captions are the held-out ones,
never trained on. Images are deterministic for a seed, so these are not statistical tests: a failure means the
models or the path changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from diffusers_backend.loading import TEST_BLANK_TEXT_ENCODERS
from triton_launcher.repository import build_tiny_repository
from triton_launcher.server import TritonServer
from workbench import shapes

from .conftest import GUIDED_MODELS, TINY_MODELS, Generator, tiny_server_options

# One held-out caption per colour, all four shapes among them, plain and beside.
CAPTIONS = tuple(
    next(scene for scene in shapes.evaluation_scenes() if scene.colour == colour) for colour in shapes.COLOURS
)
SEED = 3
TINY_SIDE = 128


def draw(generator: Generator, model: str, scene: shapes.Scene, **options: object) -> np.ndarray:
    """``scene``'s caption drawn by ``model`` at its own steps and guidance unless ``options`` say otherwise."""
    options = {"width": TINY_SIDE, "height": TINY_SIDE, "num_inference_steps": None, "seed": SEED, **options}
    return generator.generate(model, scene.caption, **options).image


def mean_colour_share(generator: Generator, model: str, **options: object) -> float:
    """How much of each image is the caption's colour, averaged over CAPTIONS: adherence as one number."""
    return float(np.mean([shapes.colour_share(draw(generator, model, scene, **options), scene.colour)
                          for scene in CAPTIONS]))


def test_the_captions_cover_every_colour_and_shape_and_were_never_trained_on() -> None:
    assert {scene.colour for scene in CAPTIONS} == set(shapes.COLOURS)
    assert {scene.shape for scene in CAPTIONS} == set(shapes.SHAPES)
    assert all(scene.held_out for scene in CAPTIONS)


@pytest.mark.parametrize("model", TINY_MODELS)
def test_the_captions_colour_is_the_colour_of_the_drawn_shape(generator: Generator, model: str) -> None:
    judged = {scene.caption: shapes.judge(draw(generator, model, scene), scene.colour) for scene in CAPTIONS}

    wrong = {caption: judgement.colour for caption, judgement in judged.items()
             if judgement.colour != caption.split()[1]}
    assert len(wrong) <= 1, f"{model} drew the wrong colour for {wrong}"
    # And the colour is the picture's, not a speck: the caption's colour covers a good part of it.
    assert min(judgement.colour_share for judgement in judged.values()) > 0.05


@pytest.mark.parametrize("model", GUIDED_MODELS)
def test_a_negative_prompt_naming_the_colour_lowers_its_share(generator: Generator, model: str) -> None:
    for scene in CAPTIONS[:3]:
        plain = shapes.colour_share(draw(generator, model, scene), scene.colour)
        negative = shapes.colour_share(draw(generator, model, scene, negative_prompt=scene.colour), scene.colour)
        assert negative < plain, f"{model}: negative prompt {scene.colour!r} on {scene.caption!r}"


@pytest.mark.parametrize("model", GUIDED_MODELS)
def test_the_default_guidance_follows_the_caption_more_closely_than_none(generator: Generator, model: str) -> None:
    unguided = mean_colour_share(generator, model, guidance_scale=0.0)
    guided = mean_colour_share(generator, model)

    assert guided > unguided


# --- every text encoder is wired: blanking one makes the drawings worse ----------------------------------------

# The encoders of each family that has several (SD1.5 has one: the tests above cover it).
ENCODERS = {
    "tiny-sdxl": ("text_encoder", "text_encoder_2"),
    "tiny-sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"),
    "tiny-flux": ("text_encoder", "text_encoder_2"),
}
BLANKED = sorted({encoder for encoders in ENCODERS.values() for encoder in encoders})


@pytest.fixture(scope="module", params=BLANKED)
def blanked_generator(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[tuple[str, Generator]]:
    """A second server on a repository of its own whose models have one text encoder's outputs zeroed."""
    encoder: str = request.param
    families = [model.removeprefix("tiny-") for model, encoders in ENCODERS.items() if encoder in encoders]
    root = tmp_path_factory.mktemp(f"blank-{encoder}")
    repository = build_tiny_repository(repository=root / "model_repository", families=families, streaming=())
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv(TEST_BLANK_TEXT_ENCODERS, encoder)  # read by the server's model stubs at load
        with TritonServer(tiny_server_options(repository, Path(root))) as server:
            generator = Generator(server)
            yield encoder, generator
            generator.client.close()


@pytest.fixture(scope="module")
def unblanked_shares(generator: Generator) -> dict[str, float]:
    return {model: mean_colour_share(generator, model) for model in ENCODERS}


def test_blanking_any_one_text_encoder_lowers_how_well_the_caption_is_followed(
    unblanked_shares: dict[str, float], blanked_generator: tuple[str, Generator]
) -> None:
    encoder, blanked = blanked_generator
    models = [model for model, encoders in ENCODERS.items() if encoder in encoders]
    log_path = blanked.server.log_path
    assert log_path is not None
    log = log_path.read_text(errors="replace")
    assert all(f"{model!r}: the outputs of its {encoder} are zeros" in log for model in models)

    blanked_shares = {model: mean_colour_share(blanked, model) for model in models}
    assert {model: share for model, share in blanked_shares.items() if share >= unblanked_shares[model]} == {}
