"""The full-size random pipelines have the published architectures (meta device only: no weight memory)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest

torch = pytest.importorskip("torch")

from diffusers_backend.families import FAMILIES, Family  # noqa: E402
from diffusers_backend.full_size import (  # noqa: E402
    FULL_SIZE_FAMILIES,
    PUBLISHED_PARAMETER_COUNTS,
    build_full_size_pipeline,
    parameter_counts,
)

COMPONENTS = [(family, component) for family, counts in PUBLISHED_PARAMETER_COUNTS.items() for component in counts]


@functools.cache
def counted(family: str) -> dict[str, int]:
    return parameter_counts(family)


@pytest.mark.parametrize(("family", "component"), COMPONENTS)
def test_parameter_count_is_within_one_percent_of_the_published_count(family: str, component: str) -> None:
    published = PUBLISHED_PARAMETER_COUNTS[family][component]
    got = counted(family)[component]
    assert got == pytest.approx(published.parameters, rel=0.01), (
        f"{family} {component}: {got:,} parameters, published {published.parameters:,} ({published.source})"
    )


@pytest.mark.parametrize("family", FULL_SIZE_FAMILIES)
def test_parameter_counts_cover_exactly_the_published_components(family: str) -> None:
    assert set(counted(family)) == set(PUBLISHED_PARAMETER_COUNTS[family])


def test_full_size_families_are_the_served_families() -> None:
    assert tuple(family.name for family in FAMILIES) == FULL_SIZE_FAMILIES


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_build_assembles_the_served_pipeline_class_when_built_on_the_meta_device(family: Family) -> None:
    pipeline = build_full_size_pipeline(family.name, dtype=torch.float16, device="meta")

    assert type(pipeline).__name__ == family.pipeline_class
    models = {name: c for name, c in pipeline.components.items() if isinstance(c, torch.nn.Module)}
    assert set(models) == set(PUBLISHED_PARAMETER_COUNTS[family.name])
    for name, model in models.items():
        tensors = [*model.parameters(), *model.buffers()]
        assert {tensor.device.type for tensor in tensors} == {"meta"}, name
        assert not model.training, name
        floating = {tensor.dtype for tensor in tensors if tensor.is_floating_point()}
        # T5 keeps its wo projections in fp32 under fp16, as from_pretrained does; everything else is fp16.
        expected = {torch.float16, torch.float32} if type(model).__name__ == "T5EncoderModel" else {torch.float16}
        assert floating == expected, name
    assert getattr(pipeline, family.denoiser) is not None


def test_build_keeps_everything_in_bfloat16_when_asked_for_bfloat16() -> None:
    pipeline = build_full_size_pipeline("sd3", dtype=torch.bfloat16, device="meta")
    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module):
            floating = {t.dtype for t in [*component.parameters(), *component.buffers()] if t.is_floating_point()}
            assert floating == {torch.bfloat16}, name


def test_build_leaves_the_callers_default_dtype_and_random_stream_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    default_dtype = torch.get_default_dtype()

    build_full_size_pipeline("sd15", dtype=torch.float16, device="meta")

    assert torch.get_default_dtype() == default_dtype
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("call", [parameter_counts, build_full_size_pipeline])
def test_unknown_family_is_rejected_with_the_known_ones_named(call: Callable[[str], object]) -> None:
    with pytest.raises(ValueError, match=r"'sd2'.*sd15"):
        call("sd2")
