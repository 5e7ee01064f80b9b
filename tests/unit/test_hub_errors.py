"""Start-up errors when a model's weights come from the Hugging Face hub (issue 7, item 6).

There is no hub here. The tests put a fake one behind ``huggingface_hub``'s own HTTP client (an ``httpx2``
mock transport answering as the hub does: status code and ``X-Error-Code`` header), so huggingface_hub raises
its real exception classes from its own response handling, and diffusers' real ``DiffusionPipeline.download``
wraps them as it does in production. The cache is an empty folder, and no token is set unless a test sets one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
import httpx2
import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.utils import _http

from diffusers_backend.errors import ModelLoadError
from diffusers_backend.loading import resolve_pipeline_folder
from diffusers_backend.settings import ModelSettings
from tests.hub_cache import put_in_hub_cache
from triton_launcher.paths import TINY_PIPELINES

Responder = Callable[[httpx2.Request], httpx2.Response]


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    # huggingface_hub reads these at import time; its functions look them up again at every call.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    return cache


@pytest.fixture
def fake_hub(hub_cache: Path) -> Iterator[Callable[[Responder], list[str]]]:
    """Install a responder as the hub; returns the list of URLs it was asked for."""
    asked: list[str] = []

    def install(responder: Responder) -> list[str]:
        def answer(request: httpx2.Request) -> httpx2.Response:
            asked.append(str(request.url))
            return responder(request)

        huggingface_hub.set_client_factory(
            lambda: httpx2.Client(transport=httpx2.MockTransport(answer), follow_redirects=True)
        )
        return asked

    yield install
    huggingface_hub.set_client_factory(_http.default_client_factory)


def hub_error(status: int, error_code: str) -> Responder:
    """Every request answered with the hub's error for ``error_code`` (the header huggingface_hub reads)."""
    return lambda request: httpx2.Response(status, headers={"X-Error-Code": error_code}, request=request)


def gated_repository(request: httpx2.Request) -> httpx2.Response:
    """A gated repository as the hub serves it to a caller without access: its model card is public, every
    file answers 401 GatedRepo."""
    if "/api/models/" in request.url.path:
        return httpx2.Response(200, json={"id": "stabilityai/stable-diffusion-3-medium-diffusers",
                                          "sha": "0" * 40, "gated": "manual", "private": False,
                                          "siblings": [{"rfilename": "model_index.json"}]}, request=request)
    return httpx2.Response(401, headers={"X-Error-Code": "GatedRepo"}, request=request)


def load_error(settings: ModelSettings) -> str:
    with pytest.raises(ModelLoadError) as caught:
        resolve_pipeline_folder(settings)
    return str(caught.value)


def test_gated_model_without_token_names_the_model_and_says_to_accept_the_licence_and_set_hf_token(
    fake_hub: Callable[[Responder], list[str]]
) -> None:
    asked = fake_hub(gated_repository)
    message = load_error(ModelSettings(model_id="stabilityai/stable-diffusion-3-medium-diffusers"))

    assert asked, "the fake hub was never asked: the test proves nothing"
    assert message.startswith("model 'stabilityai/stable-diffusion-3-medium-diffusers': ")
    assert "is gated on the hub and no token is set (HF_TOKEN)" in message
    assert "accept its licence on https://huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers" in message
    assert "set HF_TOKEN to a read token of that account" in message


def test_gated_model_with_a_token_without_access_says_to_accept_the_licence_with_that_account(
    fake_hub: Callable[[Responder], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub(hub_error(403, "GatedRepo"))
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    message = load_error(ModelSettings(model_id="flux-dev", model_source="black-forest-labs/FLUX.1-dev"))

    assert message.startswith("model 'flux-dev': black-forest-labs/FLUX.1-dev is gated on the hub and a token is set")
    assert "with the account of that token" in message


def test_wrong_repository_id_names_the_model_and_the_parameter_to_fix(
    fake_hub: Callable[[Responder], list[str]]
) -> None:
    fake_hub(hub_error(401, "RepoNotFound"))
    message = load_error(ModelSettings(model_id="sdxl", model_source="stabilityai/stable-diffusion-xl-bsae-1.0"))

    assert message.startswith("model 'sdxl': hub repository 'stabilityai/stable-diffusion-xl-bsae-1.0' does not exist")
    assert "check model_id/model_source in config.pbtxt" in message


def test_malformed_repository_id_is_refused_before_the_hub_is_asked(
    fake_hub: Callable[[Responder], list[str]]
) -> None:
    asked = fake_hub(hub_error(500, "Unexpected"))
    message = load_error(ModelSettings(model_id="sd15", model_source="not a valid//id"))

    assert asked == []
    assert "'not a valid//id' is neither a local pipeline folder nor a valid hub repository id" in message
    assert "fix model_id/model_source in config.pbtxt" in message


def test_pinned_revision_that_does_not_exist_names_the_revision_and_the_parameter(
    fake_hub: Callable[[Responder], list[str]]
) -> None:
    fake_hub(hub_error(404, "RevisionNotFound"))
    message = load_error(ModelSettings(model_id="stabilityai/sdxl-turbo", revision="v9.9"))

    assert message.startswith("model 'stabilityai/sdxl-turbo': revision 'v9.9' does not exist in hub repository "
                              "stabilityai/sdxl-turbo")
    assert "set parameter revision in config.pbtxt" in message


def test_offline_with_an_empty_cache_names_the_model_the_cache_and_how_to_fetch_it(
    fake_hub: Callable[[Responder], list[str]], hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = fake_hub(hub_error(500, "Unexpected"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = load_error(ModelSettings(model_id="sd3", model_source="stabilityai/stable-diffusion-3-medium-diffusers",
                                       revision="v1"))

    assert asked == [], "offline must not touch the network"
    assert message.startswith("model 'sd3': weights of stabilityai/stable-diffusion-3-medium-diffusers at revision "
                              "v1 cannot be had: HF_HUB_OFFLINE is set and it is not in the cache")
    assert str(hub_cache) in message
    assert "`hf download stabilityai/stable-diffusion-3-medium-diffusers --revision v1`" in message


def test_pinned_revision_loads_that_revision_from_the_cache_and_no_other(
    fake_hub: Callable[[Responder], list[str]], hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub(hub_error(500, "Unexpected"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipeline = TINY_PIPELINES / "tiny-sd15"
    if not (pipeline / "model_index.json").is_file():
        pytest.skip("tiny pipelines not built (scripts/build-tiny)")
    pinned = put_in_hub_cache(hub_cache, "example-org/tiny-sd15", pipeline, revision="v1", commit="1" * 40)
    # Another commit on main, whose pipeline class differs: loading it instead would show.
    main = put_in_hub_cache(hub_cache, "example-org/tiny-sd15", pipeline, revision="main", commit="2" * 40)
    index = json.loads((main / "model_index.json").read_text())
    (main / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))

    folder = resolve_pipeline_folder(ModelSettings(model_id="tiny", model_source="example-org/tiny-sd15",
                                                   revision="v1"))
    assert folder == pinned
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"

    message = load_error(ModelSettings(model_id="tiny", model_source="example-org/tiny-sd15", revision="v2"))
    assert "weights of example-org/tiny-sd15 at revision v2 cannot be had: HF_HUB_OFFLINE is set" in message
