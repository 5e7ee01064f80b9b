"""scripts/eval-tiny's ceiling: the data set's own images through a family's VAE alone, judged like a drawing."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from workbench import shapes
from workbench.eval_tiny import vae_round_trip


def test_the_trained_vae_keeps_what_the_judge_reads_and_an_untrained_one_does_not() -> None:
    scenes = shapes.evaluation_scenes()
    trained = vae_round_trip("sd15", scenes)
    untrained = vae_round_trip("sd15", scenes, trained=False)

    assert trained.images == untrained.images == len(scenes)
    # The judge reads every shape of the data itself (test_shapes.py); a trained VAE keeps nearly all of them.
    assert trained.shape_accuracy >= 0.9, trained.mistakes
    assert trained.colours_right + trained.shapes_right > untrained.colours_right + untrained.shapes_right
    assert all(mistake.startswith("through the VAE: ") for mistake in trained.mistakes)
