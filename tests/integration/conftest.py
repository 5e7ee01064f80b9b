"""One real tritonserver with the tiny models, shared by the integration tests of a session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inference_client import contract, triton
from triton_launcher.repository import build_tiny_repository
from triton_launcher.server import ServerOptions, TritonServer, loopback_options

FAMILIES = ("sd15", "sdxl", "sd3", "flux")
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
