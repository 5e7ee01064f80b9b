"""Grouping of a dynamic batch into pipeline calls (no torch)."""

from __future__ import annotations

from dataclasses import replace

from diffusers_backend.batching import group_requests
from diffusers_backend.validation import GenerationRequest

BASE = GenerationRequest(prompt="a", negative_prompt=None, width=256, height=256, steps=4,
                         guidance_scale=7.5, seed=0)


def test_group_requests_puts_everything_in_one_call_when_settings_agree() -> None:
    batch = [replace(BASE, prompt=str(index), seed=index) for index in range(4)]
    assert group_requests(batch) == [[0, 1, 2, 3]]


def test_group_requests_splits_by_size_steps_and_guidance_when_they_differ() -> None:
    batch = [BASE, replace(BASE, width=128), replace(BASE, steps=8), BASE,
             replace(BASE, guidance_scale=1.0), replace(BASE, width=128)]
    assert group_requests(batch) == [[0, 3], [1, 5], [2], [4]]


def test_group_requests_separates_negative_prompts_when_some_requests_have_none() -> None:
    batch = [BASE, replace(BASE, negative_prompt="blurry"), replace(BASE, negative_prompt="dark"), BASE]
    assert group_requests(batch) == [[0, 3], [1, 2]]


def test_group_requests_caps_group_size_when_a_maximum_is_given() -> None:
    assert group_requests([BASE] * 5, max_group_size=2) == [[0, 1], [2, 3], [4]]


def test_group_requests_returns_nothing_when_batch_is_empty() -> None:
    assert group_requests([]) == []
