"""The capability layer through the real tritonserver: the seed's three examples, refusals, the CLI."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from capability import (
    CapabilityHandle,
    CapabilityLayer,
    ConcurrencyLimitError,
    DeniedError,
    GenerationError,
    ModelNotServedError,
    ServerBusyError,
    UnknownServerError,
)
from triton_launcher.server import TritonServer


@pytest.fixture(scope="module")
def layer(tiny_server: TritonServer) -> Iterator[CapabilityLayer]:
    with CapabilityLayer(tiny_server.options.state_dir) as layer:
        yield layer


@pytest.fixture(scope="module")
def authority(layer: CapabilityLayer) -> str:
    return layer.create_authority("sys").id


def mint(layer: CapabilityLayer, authority: str, server: TritonServer, **params: object) -> CapabilityHandle:
    return layer.mint("sys", authority, {"server_url": server.url, **params}).give("alice")


def decoded(result: dict[str, object]) -> Image.Image:
    assert result["format"] == "png"
    image = Image.open(io.BytesIO(base64.b64decode(str(result["image"]))))
    assert image.format == "PNG"
    assert image.mode == "RGB"
    assert image.size == (result["width"], result["height"])
    return image


def test_seed_example_simple_generation_uses_the_default_model_when_no_options_are_given(
    layer: CapabilityLayer, authority: str, tiny_server: TritonServer
) -> None:
    gen_cap = mint(layer, authority, tiny_server, default_model="tiny-sd15")
    result = gen_cap.text_to_image("a beautiful sunset over mountains")
    assert decoded(result).size == (128, 128)  # the tiny SD1.5's native size
    assert result["model"] == "tiny-sd15"
    assert isinstance(result["seed"], int)


def test_seed_example_custom_parameters_are_honoured_when_given(
    layer: CapabilityLayer, authority: str, tiny_server: TritonServer
) -> None:
    gen_cap = mint(layer, authority, tiny_server, default_model="tiny-sd15")
    options = {"width": 768, "height": 512, "numInferenceSteps": 30, "guidanceScale": 7.5,
               "negativePrompt": "blurry, low quality", "seed": 42}
    result = gen_cap.text_to_image("a futuristic cityscape at night", options)
    assert decoded(result).size == (768, 512)
    assert result["seed"] == 42
    again = gen_cap.text_to_image("a futuristic cityscape at night", options)
    assert again["image"] == result["image"]


def test_seed_example_model_override_uses_the_named_model_when_it_is_allowed(
    layer: CapabilityLayer, authority: str, tiny_server: TritonServer
) -> None:
    xl_cap = mint(layer, authority, tiny_server, default_model="tiny-sd15",
                  allowed_models=["tiny-sd15", "tiny-sdxl"])
    result = xl_cap.text_to_image("detailed portrait", {"modelId": "tiny-sdxl", "width": 1024, "height": 1024})
    assert decoded(result).size == (1024, 1024)
    assert result["model"] == "tiny-sdxl"


def test_restricted_capability_refuses_another_model_before_reaching_the_server(
    layer: CapabilityLayer, authority: str, tiny_server: TritonServer
) -> None:
    restricted = mint(layer, authority, tiny_server, default_model="tiny-sd15", allowed_models=["tiny-sd15"])
    with pytest.raises(DeniedError, match="model 'tiny-flux' is not allowed"):
        restricted.text_to_image("a cat", {"modelId": "tiny-flux"})
    assert restricted.show().params["allowed_models"] == ["tiny-sd15"]


def test_server_refusal_names_the_option_when_the_family_needs_a_larger_multiple(
    layer: CapabilityLayer, authority: str, tiny_server: TritonServer
) -> None:
    gen_cap = mint(layer, authority, tiny_server, default_model="tiny-sd3")
    with pytest.raises(GenerationError, match="width=520 is invalid: must be a positive multiple of 16"):
        gen_cap.text_to_image("a cat", {"width": 520, "height": 256, "numInferenceSteps": 1})


def test_unserved_model_is_refused_with_the_served_list(
    layer: CapabilityLayer, authority: str, tiny_server: TritonServer
) -> None:
    gen_cap = mint(layer, authority, tiny_server, default_model="stabilityai/sdxl-turbo")
    with pytest.raises(ModelNotServedError, match=r"'stabilityai/sdxl-turbo' is not served .* \['tiny-flux'"):
        gen_cap.text_to_image("a cat", {"numInferenceSteps": 1})


def test_a_server_with_no_known_key_is_refused_with_how_to_register_it(
    layer: CapabilityLayer, authority: str
) -> None:
    elsewhere = layer.mint("sys", authority, {"server_url": "http://127.0.0.1:9", "default_model": "tiny-sd15"})
    with pytest.raises(UnknownServerError, match=re.escape("python -m capability register-server --url http://127.0.0.1:9")):
        elsewhere.text_to_image("a cat")


def run_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "capability", *arguments], capture_output=True, text=True,
                          timeout=300, check=False)


def test_cli_mints_delegates_generates_and_refuses_when_used_as_documented(
    tiny_server: TritonServer, authority: str, tmp_path: Path
) -> None:
    state = ["--state-dir", str(tiny_server.options.state_dir)]
    mint_result = run_cli("mint", *state, "--as", "sys", "--authority", authority, "--server-url", tiny_server.url,
                          "--default-model", "tiny-flux", "--max-width", "512", "--max-height", "512",
                          "--max-steps", "8")
    assert mint_result.returncode == 0, mint_result.stderr
    parent = mint_result.stdout.strip()
    child = run_cli("delegate", *state, "--as", "sys", "--cap", parent, "--max-steps", "4").stdout.strip()
    assert run_cli("give", *state, "--as", "sys", "--cap", child, "--to", "bob").returncode == 0

    out = tmp_path / "flux.png"
    generated = run_cli("generate", *state, "--as", "bob", "--cap", child, "--prompt", "a paper boat",
                        "--width", "128", "--height", "64", "--steps", "4", "--seed", "7", "--out", str(out),
                        "--json")
    assert generated.returncode == 0, generated.stderr
    result = json.loads(generated.stdout)
    assert (result["width"], result["height"], result["seed"], result["model"]) == (128, 64, 7, "tiny-flux")
    with Image.open(out) as image:
        assert image.size == (128, 64)

    too_many_steps = run_cli("generate", *state, "--as", "bob", "--cap", child, "--prompt", "x",
                             "--width", "128", "--height", "64", "--steps", "5")
    assert too_many_steps.returncode == 1
    assert "numInferenceSteps=5 exceeds max_steps=4" in too_many_steps.stderr
    widened = run_cli("delegate", *state, "--as", "bob", "--cap", child, "--max-width", "1024", "--json")
    assert widened.returncode == 1
    assert json.loads(widened.stdout)["error"] == "InvalidParamsError"
    audit = json.loads(run_cli("audit", *state, "--as", "bob", "--cap", child, "--json").stdout)
    assert [(entry["action"], entry["outcome"]) for entry in audit] == [
        ("delegate", "ok"), ("give", "ok"), ("generate", "ok"), ("generate", "denied"), ("delegate", "denied")]


def test_generation_beyond_max_concurrent_is_refused_while_a_delegate_holds_the_slot(
    layer: CapabilityLayer, authority: str, tiny_server: TritonServer
) -> None:
    parent = mint(layer, authority, tiny_server, default_model="tiny-sd15", max_concurrent=1)
    child = parent.delegate({"max_concurrent": 1})
    options = {"width": 64, "height": 64, "numInferenceSteps": 1}
    # A generation in flight under the child (another process would hold the same row in the shared store).
    lease = layer.capabilities.acquire_slot("alice", child.id)
    with pytest.raises(ConcurrencyLimitError, match="allows 1 concurrent generation"):
        parent.text_to_image("a cat", options)
    layer.capabilities.release_slot(lease)
    assert parent.text_to_image("a cat", options)["width"] == 64
    outcomes = [entry["outcome"] for entry in layer.capabilities.audit_log("alice", parent.id)
                if entry["action"] == "generate"]
    assert outcomes == ["denied", "ok"]


def test_a_flood_gets_clear_busy_refusals_and_the_server_keeps_serving_when_the_queue_is_full(
    layer: CapabilityLayer, authority: str, tiny_server: TritonServer,
) -> None:
    import threading

    flood = 40  # well over what tiny-sd15 takes at once: 2 instances x batches of 4, plus 16 queued
    handle = mint(layer, authority, tiny_server, default_model="tiny-sd15", max_concurrent=flood)
    outcomes: list[object] = []
    lock = threading.Lock()

    def generate(seed: int) -> None:
        try:
            outcome: object = handle.text_to_image("a flood", {"width": 256, "height": 256,
                                                               "numInferenceSteps": 20, "seed": seed})
        except Exception as error:
            outcome = error
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=generate, args=(seed,)) for seed in range(flood)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    layer.generator.close()  # the threads' HTTP clients
    assert len(outcomes) == flood
    busy = [outcome for outcome in outcomes if isinstance(outcome, ServerBusyError)]
    done = [outcome for outcome in outcomes if isinstance(outcome, dict)]
    assert len(busy) + len(done) == flood, [outcome for outcome in outcomes if not isinstance(outcome, dict)][:3]
    assert busy, "nothing was refused: the queue did not fill"
    assert done, "nothing was generated"
    assert "is busy: the model's queue is full (its max_queue_size); retry later" in str(busy[0])
    # Nothing broke: the next request is served, and every refusal is in the audit log as failed.
    assert decoded(handle.text_to_image("after the flood", {"width": 64, "height": 64, "seed": 1})).size == (64, 64)
    log = layer.capabilities.audit_log("alice", handle.id)
    assert sum(entry["outcome"] == "failed" and "is busy" in (entry["detail"] or "") for entry in log) == len(busy)
