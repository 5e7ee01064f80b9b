"""The tiny models' data set (workbench/shapes.py): seeded, captioned, and judged right by its own classifier."""

from __future__ import annotations

import numpy as np
import pytest

from workbench import shapes


def test_every_scene_renders_as_what_its_caption_says_at_both_sizes() -> None:
    for size in (32, 64):
        for index, scene in enumerate(shapes.all_scenes()):
            image = shapes.render(scene, size, np.random.default_rng(index))
            assert image.shape == (size, size, 3)
            assert image.dtype == np.uint8
            judged = shapes.judge(image, scene.colour)
            assert (judged.colour, judged.shape) == (scene.colour, scene.shape), scene.caption
            assert judged.colour_share > 0.02  # a small shape beside, on 32x32, covers 4 %


def test_examples_depend_on_the_index_and_seed_only() -> None:
    first = shapes.example(7, 32, seed=3)
    again = shapes.example(7, 32, seed=3)
    assert first[0] == again[0]
    assert np.array_equal(first[1], again[1])
    assert any(not np.array_equal(shapes.example(index, 32, seed=4)[1], shapes.example(index, 32, seed=3)[1])
               for index in range(5))


def test_held_out_captions_are_never_trained_on_and_captions_read_as_prompts() -> None:
    training = {scene.caption for scene in shapes.training_scenes()}
    held_out = {scene.caption for scene in shapes.evaluation_scenes()}
    assert held_out
    assert not training & held_out
    assert len(training | held_out) == len(shapes.all_scenes())
    captions = {shapes.example(index, 32)[0] for index in range(200)}
    assert captions <= training
    assert "an orange circle on the left on a black background" in training | held_out
    assert "a orange" not in " ".join(training | held_out)


@pytest.mark.parametrize("fill", ["blank", "noise"])
def test_an_image_without_a_clear_shape_is_judged_as_nothing_or_not_the_caption(fill: str) -> None:
    rng = np.random.default_rng(0)
    image = np.full((32, 32, 3), 128, np.uint8) if fill == "blank" else rng.integers(0, 256, (32, 32, 3), np.uint8)
    judged = shapes.judge(image, "red")
    if fill == "blank":
        assert (judged.colour, judged.shape) == (None, None)
    assert judged.colour_share < 0.2


def test_a_dark_frame_and_stray_specks_do_not_fool_the_judge() -> None:
    """What generated images look like: their outermost pixel darker (zero padding), and specks far from the
    shape. Neither may turn the background into foreground or stretch the shape's box."""
    rng = np.random.default_rng(7)
    for scene in (shapes.Scene("circle", "green", "white"), shapes.Scene("square", "red", "gray", "on the left"),
                  shapes.Scene("triangle", "blue", "black", "on the right")):
        image = shapes.render(scene, 128, rng).astype(np.int16)
        image[0, :] = image[-1, :] = image[:, 0] = image[:, -1] = np.clip(image[0, 0] - 70, 0, 255)
        for row, column in rng.integers(6, 122, size=(12, 2)):
            if np.all(image[row, column] == image[6, 6]):  # a background pixel
                image[row:row + 2, column:column + 2] = shapes.COLOURS["yellow"]

        judgement = shapes.judge(image.astype(np.uint8), scene.colour)

        assert (judgement.colour, judgement.shape) == (scene.colour, scene.shape)
