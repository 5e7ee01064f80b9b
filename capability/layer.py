"""The Python face of the layer, shaped like the seed's TypeScript one::

    layer = CapabilityLayer(state_dir)
    gen_cap = layer.mint("alice", authority_id, {"server_url": url, "default_model": "tiny-sd15"})
    result = gen_cap.text_to_image("a beautiful sunset over mountains", {"width": 768, "seed": 42})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference_client.contract import Progress
from inference_client.state import STATE_DIR

from .capabilities import Capabilities, Capability
from .generation import RETRY_UNAVAILABLE_S, Generation, TextToImage
from .store import Store, open_store


class CapabilityLayer:
    """The store in a state dir and the servers its capabilities name."""

    def __init__(self, state_dir: Path = STATE_DIR, store: Store | str | None = None,
                 retry_unavailable_s: float = RETRY_UNAVAILABLE_S) -> None:
        """``store``: a store, or its URL (``sqlite:///PATH``, ``postgresql://USER@HOST:PORT/DB``); None: the one
        ``$CAPABILITY_STORE`` names, else the SQLite file in ``state_dir``. ``retry_unavailable_s``: how long a
        request with a seed waits for a restarting server (0: not at all)."""
        self.state_dir = state_dir
        self.store = store if isinstance(store, Store) else open_store(store, state_dir)
        self.capabilities = Capabilities(self.store)
        self.generator = TextToImage(self.store, state_dir, retry_unavailable_s)

    def close(self) -> None:
        """Close the server connections and this thread's store connection."""
        self.generator.close()
        self.store.close()

    def __enter__(self) -> CapabilityLayer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def create_authority(self, admin: str, namespace: str = "diffusers") -> CapabilityHandle:
        return self._handle(self.capabilities.create_authority(admin, namespace))

    def mint(self, entity: str, authority_id: str, params: Mapping[str, Any]) -> CapabilityHandle:
        return self._handle(self.capabilities.mint(entity, authority_id, params))

    def handle(self, entity: str, capability_id: str) -> CapabilityHandle:
        """``entity``'s view of a capability: every use is checked when made, not here."""
        return CapabilityHandle(self, entity, capability_id)

    def _handle(self, capability: Capability) -> CapabilityHandle:
        return CapabilityHandle(self, capability.owner, capability.id)


@dataclass(frozen=True)
class CapabilityHandle:
    """A capability id in the hands of one entity."""

    layer: CapabilityLayer
    entity: str
    id: str

    def text_to_image(self, prompt: str, options: Mapping[str, Any] | None = None,
                      on_progress: Callable[[Progress], None] | None = None) -> dict[str, Any]:
        """Generate one image; ``on_progress`` (on the model's streaming variant) hears of every step."""
        return self.layer.generator.text_to_image(self.entity, self.id, prompt, options, on_progress=on_progress)

    def start_text_to_image(self, prompt: str, options: Mapping[str, Any] | None = None,
                            on_progress: Callable[[Progress], None] | None = None) -> Generation:
        """Start a generation on the model's streaming variant in the background; ``cancel()`` it, or wait
        for its ``result()``."""
        generator = self.layer.generator
        return Generation(lambda cancellation: generator.text_to_image(
            self.entity, self.id, prompt, options, on_progress=on_progress, cancellation=cancellation),
            cleanup=generator.release_thread_clients)

    def delegate(self, restrictions: Mapping[str, Any]) -> CapabilityHandle:
        return self.layer._handle(self.layer.capabilities.delegate(self.entity, self.id, restrictions))

    def give(self, recipient: str) -> CapabilityHandle:
        given = self.layer.capabilities.give(self.entity, self.id, recipient)
        return self.layer._handle(given)

    def revoke(self) -> list[str]:
        return self.layer.capabilities.revoke(self.entity, self.id)

    def show(self) -> Capability:
        return self.layer.capabilities.show(self.entity, self.id)

