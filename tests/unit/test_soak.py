"""The checks of scripts/soak (no server): response matching, memory growth, audit completeness, the plan."""

from __future__ import annotations

import numpy as np
import pytest

from capability import GenerationError, ServerBusyError
from capability.png import encode_png_base64
from triton_launcher.paths import MODEL_REPOSITORY
from workbench import soak
from workbench.soak import (
    TINY_MODELS,
    Shape,
    audit_problems,
    check_response,
    client_schedule,
    is_server_5xx,
    memory_growth,
    queue_limit,
    request_shapes,
)

SHAPE = Shape(model="tiny-sd15", width=64, height=32, seed=7, steps=2, prompt="a test")


def noise(seed: int, shape: Shape = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (shape.height, shape.width, 3), dtype=np.uint8)


def result(pixels: np.ndarray, **changes: object) -> dict[str, object]:
    height, width, _ = pixels.shape
    return {"image": encode_png_base64(pixels), "width": width, "height": height, "format": "png",
            "seed": SHAPE.seed, "model": SHAPE.model, **changes}


def test_a_response_matches_its_reference_exactly_or_within_one_uint8_step() -> None:
    reference = noise(1)
    assert check_response(SHAPE, reference, result(reference)) == soak.Check(None, exact=True)
    nudged = reference.copy()
    nudged[0, 0, 0] = nudged[0, 0, 0] + 1 if nudged[0, 0, 0] < 255 else 254
    assert check_response(SHAPE, reference, result(nudged)) == soak.Check(None, exact=False)


def test_a_response_meant_for_another_request_is_caught_when_its_image_or_metadata_differ() -> None:
    reference = noise(1)
    assert check_response(SHAPE, reference, result(noise(2))).problem == "different image"
    assert check_response(SHAPE, reference, result(reference, seed=8)).problem == "wrong seed"
    assert check_response(SHAPE, reference, result(reference, model="tiny-flux")).problem == "wrong model"
    assert check_response(SHAPE, reference, result(reference, width=32, height=64)).problem == "wrong size"
    transposed = np.ascontiguousarray(reference.transpose(1, 0, 2))
    assert check_response(SHAPE, reference, result(transposed, width=64, height=32)).problem == "wrong size"
    assert check_response(SHAPE, reference, result(reference, image="bm90IGEgcG5n")).problem == "undecodable image"
    other_size = np.zeros((16, 16, 3), dtype=np.uint8)
    assert check_response(SHAPE, other_size, result(reference)).problem == "different image"


def test_memory_growth_compares_the_medians_of_the_first_and_last_quarters() -> None:
    flat = memory_growth([2000, 2010, 2000, 2005, 2000, 2010, 2000, 2010])
    assert flat["growth_mib"] == 0
    rising = memory_growth([1000, 1000, 1100, 1200, 1300, 1400, 1500, 1500])
    assert (rising["first_quarter_median_mib"], rising["last_quarter_median_mib"]) == (1000, 1500)
    assert (rising["growth_mib"], rising["growth_fraction"]) == (500, 0.5)
    # One sample taken mid-batch does not decide: the quarters' medians ignore it.
    assert memory_growth([1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1900])["growth_mib"] == 0
    assert memory_growth([1000])["growth_mib"] == 0
    with pytest.raises(ValueError, match="no memory samples"):
        memory_growth([])


def test_audit_is_complete_only_with_one_successful_matching_record_per_request_in_order() -> None:
    other = Shape(model="tiny-flux", width=128, height=96, seed=9, steps=2, prompt="another")

    def record(shape: Shape, outcome: str = "ok") -> dict[str, object]:
        return {"action": "generate", "outcome": outcome, "model": shape.model, "width": shape.width,
                "height": shape.height, "steps": shape.steps}

    assert audit_problems([SHAPE, other], [record(SHAPE), record(other)]) == []
    assert audit_problems([SHAPE, other], [record(SHAPE)]) == ["1 generate records for 2 requests"]
    assert audit_problems([SHAPE], [record(SHAPE), record(SHAPE)]) == ["2 generate records for 1 requests"]
    assert audit_problems([SHAPE], [record(SHAPE, "failed")]) == ["request 0: outcome 'failed'"]
    assert audit_problems([SHAPE, other], [record(other), record(SHAPE)])[0].startswith("request 0: recorded")


def test_request_shapes_cover_every_family_with_sizes_every_family_accepts_and_distinct_seeds() -> None:
    shapes = request_shapes(24, steps=4)
    assert {shape.model for shape in shapes} == set(TINY_MODELS)
    assert all(shape.width % 16 == 0 and shape.height % 16 == 0 for shape in shapes)
    assert all(64 <= side <= 256 for shape in shapes for side in (shape.width, shape.height))
    assert len({shape.seed for shape in shapes}) == len({shape.prompt for shape in shapes}) == 24
    assert len({(shape.model, shape.width, shape.height) for shape in shapes}) == 24


def test_client_schedules_are_reproducible_and_differ_between_clients() -> None:
    assert client_schedule(3, 50, 24) == client_schedule(3, 50, 24)
    assert client_schedule(3, 50, 24) != client_schedule(4, 50, 24)
    assert all(0 <= index < 24 for index in client_schedule(0, 200, 24))


def test_only_server_failures_count_as_5xx() -> None:
    assert is_server_5xx(ServerBusyError("http://127.0.0.1:1 is busy"))
    assert is_server_5xx(GenerationError("the server failed the request (500): boom"))
    assert not is_server_5xx(GenerationError("the server refused the request: width=520 is invalid"))
    assert not is_server_5xx(ValueError("(503)"))


def test_the_queue_limit_is_read_from_the_configs_and_the_cli_stays_below_it() -> None:
    assert queue_limit(MODEL_REPOSITORY) == 16
    with pytest.raises(SystemExit) as refused:
        soak.main(["--clients", "17"])
    assert refused.value.code == 2
