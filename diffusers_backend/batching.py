"""Which requests of one dynamic batch can share a pipeline call.

A diffusers call takes one size, step count and guidance scale for all its prompts, so a batch is split
into groups of requests that agree on those (see :attr:`GenerationRequest.group_key`). Each request keeps
its own ``torch.Generator``, so its image depends on its own seed only, whatever else is queued.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol, TypeVar


class Groupable(Protocol):
    @property
    def group_key(self) -> Hashable: ...


RequestT = TypeVar("RequestT", bound=Groupable)


def group_requests(requests: Sequence[RequestT], max_group_size: int | None = None) -> list[list[int]]:
    """Indices of ``requests`` grouped by key, groups ordered by first appearance, order kept within a group.

    ``max_group_size`` splits larger groups, to bound one call's memory.
    """
    groups: dict[Hashable, list[list[int]]] = {}
    for index, request in enumerate(requests):
        chunks = groups.setdefault(request.group_key, [[]])
        if max_group_size is not None and len(chunks[-1]) >= max_group_size:
            chunks.append([])
        chunks[-1].append(index)
    return [chunk for chunks in groups.values() for chunk in chunks]
