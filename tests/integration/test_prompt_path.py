"""The prompt reaches the image: the trained tiny models, through the real server, draw what the caption asks.

Each test would fail if a part of the prompt path broke: the prompt not reaching the text encoder (every caption
would be drawn in one colour, right for one caption in six), or the first text encoder of SDXL, SD3 or FLUX
dropped. The judge is workbench/shapes.py's classifier, which sees only the pixels. The captions are held-out
ones, never trained on. Images are deterministic for a seed, so these are not statistical tests: a failure means
the models or the path changed.

Not yet here (#15 is open): the negative prompt, guidance against none, and every other text encoder. Measured
with the colour shares of six captions, the committed tiny models do not yet tell those apart reliably."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from diffusers_backend.loading import TEST_BLANK_TEXT_ENCODERS
from triton_launcher.repository import build_tiny_repository
from triton_launcher.server import TritonServer
from workbench import shapes

from .conftest import TINY_MODELS, Generator, tiny_server_options


def one_caption_per_colour() -> tuple[shapes.Scene, ...]:
    """One held-out scene per colour, each of a shape not chosen yet while there are any: all four shapes."""
    chosen: list[shapes.Scene] = []
    for colour in shapes.COLOURS:
        candidates = [scene for scene in shapes.evaluation_scenes() if scene.colour == colour]
        unused = [scene for scene in candidates if scene.shape not in {other.shape for other in chosen}]
        chosen.append((unused or candidates)[0])
    return tuple(chosen)


CAPTIONS = one_caption_per_colour()
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
def test_the_drawn_shape_is_mostly_the_captions_colour(generator: Generator, model: str) -> None:
    judged = {scene.caption: shapes.judge(draw(generator, model, scene), scene.colour).colour for scene in CAPTIONS}
    right = [caption for caption, colour in judged.items() if caption.split()[1] == colour]
    # Six colours: by chance one in six would be right.
    assert len(right) >= len(CAPTIONS) // 2, f"{model} drew {judged}"


# --- every text encoder is wired: blanking one makes the drawings worse ----------------------------------------

# The first text encoder of each family that has several (SD1.5's only one is covered above). The others (SDXL's
# second CLIP, SD3's CLIP-G and T5, FLUX's T5) are not proven yet: trained as they are, the tiny models draw
# from the first encoder mostly, and blanking another does not reliably lower the score (#15, open).
ENCODERS = {
    "tiny-sdxl": ("text_encoder",),
    "tiny-sd3": ("text_encoder",),
    "tiny-flux": ("text_encoder",),
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
