"""One real tritonserver with the tiny models, shared by the integration tests of a session."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from capability import CapabilityLayer
from capability.tokens import Tokens
from inference_client import contract, triton
from triton_launcher.repository import build_tiny_repository
from triton_launcher.server import ServerOptions, TritonServer, loopback_options
from workbench.service import ServiceProcess

FAMILIES = ("sd15", "sdxl", "sd3", "flux")


def png_pixels(encoded: str) -> np.ndarray:
    """A base64 PNG of the capability layer's answers as an RGB uint8 array."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB"))


def assert_same_image(image: np.ndarray, reference: np.ndarray) -> None:
    """The same seed's image: equal within one uint8 step (the stubs' thread count, which the CPU core sharing
    varies, changes the order of float sums; docs/contract.md#reproducibility)."""
    assert image.shape == reference.shape
    assert np.abs(image.astype(np.int16) - reference.astype(np.int16)).max() <= 1
TINY_MODELS = tuple(f"tiny-{family}" for family in FAMILIES)
# Families whose pipeline uses guidance and a negative prompt by default (tiny-flux mirrors FLUX.1-schnell).
GUIDED_MODELS = ("tiny-sd15", "tiny-sdxl", "tiny-sd3")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_repository() -> Path:
    return build_tiny_repository()


def tiny_server_options(repository: Path, state_dir: Path) -> ServerOptions:
    return loopback_options(repository, state_dir, ready_timeout_s=300)


@pytest.fixture(scope="session")
def tiny_server(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    with TritonServer(tiny_server_options(tiny_repository, tmp_path_factory.mktemp("state"))) as server:
        yield server


class Generator:
    """Sends text-to-image requests to the tiny server with the inference key."""

    def __init__(self, server: TritonServer) -> None:
        self.server = server
        self.client = server.http_client(timeout_s=300)

    def infer(self, model: str, request: contract.TextToImage, headers: dict[str, str] | None = None) -> Any:
        return self.client.infer(model, triton.http_inputs(request), outputs=triton.http_outputs(),
                                 headers=self.server.headers if headers is None else headers)

    def generate(self, model: str, prompt: str = "a red cube on a table", **options: Any) -> contract.GeneratedImage:
        options.setdefault("width", 128)
        options.setdefault("height", 96)
        options.setdefault("num_inference_steps", 2)
        return contract.read_result(self.infer(model, contract.TextToImage(prompt, **options)))


@pytest.fixture(scope="session")
def generator(tiny_server: TritonServer) -> Iterator[Generator]:
    generator = Generator(tiny_server)
    yield generator
    generator.client.close()


class ServiceUnderTest:
    """The capability service (a real process) on the tiny server's store, with an admin who issues tokens and
    mints capabilities for the tests."""

    ADMIN = "service-admin"

    def __init__(self, process: ServiceProcess, layer: CapabilityLayer, server: TritonServer) -> None:
        self.process = process
        self.layer = layer
        self.server = server
        self.authority_id = layer.create_authority(self.ADMIN).id
        self.tokens = Tokens(layer.store)
        self._references: dict[str, dict[str, Any]] = {}

    @property
    def url(self) -> str:
        return self.process.url

    def token_for(self, entity: str, expires_in_s: float = 3600.0) -> str:
        return self.tokens.issue(self.ADMIN, entity, expires_in_s).token

    def reference(self, prompt: str, options: dict[str, Any]) -> dict[str, Any]:
        """The Python API's result for ``prompt`` and ``options`` (with a seed and a ``modelId``), computed once per
        session: the same image, whichever capability asks, and the seed's large examples take a minute each here."""
        key = json.dumps([prompt, options], sort_keys=True)
        if key not in self._references:
            capability = self.mint(self.ADMIN, default_model=options["modelId"])
            self._references[key] = self.layer.handle(self.ADMIN, capability).text_to_image(prompt, options)
        return self._references[key]

    def mint(self, entity: str, **params: Any) -> str:
        """A diffusers.generate capability on the tiny server, held by ``entity``; its id."""
        minted = self.layer.mint(self.ADMIN, self.authority_id, {"server_url": self.server.url, **params})
        return minted.give(entity).id if entity != self.ADMIN else minted.id


@pytest.fixture(scope="session")
def capability_service(tiny_server: TritonServer, tmp_path_factory: pytest.TempPathFactory
                       ) -> Iterator[ServiceUnderTest]:
    state_dir = tiny_server.options.state_dir
    log = tmp_path_factory.mktemp("service") / "service.log"
    with CapabilityLayer(state_dir) as layer, ServiceProcess(state_dir, log) as process:
        yield ServiceUnderTest(process, layer, tiny_server)
