"""The TypeScript client (clients/typescript/) against the real capability service and the tiny Triton server.

The Python API computes the seed's examples first; Node's test runner then runs clients/typescript/test/*.test.js
with those results in a fixture file, and checks that the client gets the same images for the same seeds, progress,
cancellation, delegation, give, revoke and the documented errors. Needs Node.js >= 18 with npm (the bootstrap
installs the pinned TypeScript compiler on first use).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Protocol

import pytest

from capability import CapabilityLayer

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "typescript"
BOOTSTRAP_TIMEOUT_S = 600
NODE_TIMEOUT_S = 900

PYTHON_ENTITY = "ts-python"
ADMIN, ALICE, BOB = "ts-admin", "ts-alice", "ts-bob"

# The README's curl example of the portrait uses this seed too, so that the Python API draws that large image once.
PORTRAIT_SEED = 1234
# The seed's examples with the tiny models in place of the hub ids: stabilityai/stable-diffusion-2-1 is tiny-sd15
# (both load in the sd15 model), stabilityai/sdxl-turbo and stable-diffusion-xl-base-1.0 are tiny-sdxl.
# (name, the seed's line, mint parameters besides server_url, prompt, options or None where the seed passes none)
SEED_EXAMPLES: list[tuple[str, str, dict[str, Any], str, dict[str, Any] | None]] = [
    ("simple generation", 'genCap.textToImage("a beautiful sunset over mountains")',
     {"default_model": "tiny-sd15"}, "a beautiful sunset over mountains", None),
    ("custom parameters", 'genCap.textToImage("a futuristic cityscape at night", {width: 768, height: 512, …})',
     {"default_model": "tiny-sd15"}, "a futuristic cityscape at night",
     {"width": 768, "height": 512, "numInferenceSteps": 30, "guidanceScale": 7.5,
      "negativePrompt": "blurry, low quality", "seed": 42}),
    ("model override", 'genCap.textToImage("detailed portrait", {modelId: "tiny-sdxl", width: 1024, height: 1024})',
     {"default_model": "tiny-sd15"}, "detailed portrait",
     {"modelId": "tiny-sdxl", "width": 1024, "height": 1024, "seed": PORTRAIT_SEED}),
    ("restricted models", 'restrictedCap (default tiny-sdxl, allowed [tiny-sdxl, tiny-sd15]).textToImage(…)',
     {"default_model": "tiny-sdxl", "allowed_models": ["tiny-sdxl", "tiny-sd15"]},
     "a beautiful sunset over mountains", None),
]
PROGRESS_EXAMPLE = ("a lighthouse in a storm", {"width": 64, "height": 64, "numInferenceSteps": 4, "seed": 7})


class CapabilityServiceFixture(Protocol):
    """What conftest's ``capability_service`` offers: the running service and the layer on its store."""

    @property
    def url(self) -> str: ...

    @property
    def layer(self) -> CapabilityLayer: ...

    def token_for(self, entity: str) -> str: ...

    def mint(self, entity: str, **params: Any) -> str: ...

    def reference(self, prompt: str, options: dict[str, Any]) -> dict[str, Any]: ...


def bootstrap_typescript() -> None:
    """Install and compile the client (only a stamp check when nothing changed)."""
    script = 'source "$1/scripts/lib/typescript.sh" && bootstrap_typescript "$1"'
    completed = subprocess.run(["bash", "-c", script, "bootstrap", str(ROOT)], capture_output=True, text=True,
                               timeout=BOOTSTRAP_TIMEOUT_S, check=False)
    if completed.returncode != 0:
        pytest.fail(f"bootstrap_typescript failed:\n{completed.stdout}{completed.stderr}", pytrace=False)


def python_results(service: CapabilityServiceFixture) -> dict[str, Any]:
    """The seed's examples and a streamed generation through the Python API; the unseeded ones draw a seed,
    which the client then sends."""
    layer = service.layer
    examples = []
    for name, seed_line, params, prompt, options in SEED_EXAMPLES:
        if options is not None and "seed" in options:  # computed once per session, whoever asks
            result = service.reference(prompt, {**options, "modelId": options.get("modelId", params["default_model"])})
        else:
            capability = service.mint(PYTHON_ENTITY, **params)
            result = layer.handle(PYTHON_ENTITY, capability).text_to_image(prompt, options)
        examples.append({"name": name, "seed": seed_line, "mint": params, "prompt": prompt,
                         **({} if options is None else {"options": options}), "python": result})
    streamed = layer.handle(PYTHON_ENTITY, service.mint(PYTHON_ENTITY, default_model="tiny-sd15"))
    steps_done: list[int] = []
    prompt, options = PROGRESS_EXAMPLE
    progress_result = streamed.text_to_image(prompt, options, on_progress=lambda p: steps_done.append(p.steps_done))
    return {"examples": examples, "progress": {"prompt": prompt, "options": options, "stepsDone": steps_done,
                                               "python": progress_result},
            "serverUrl": streamed.show().params["server_url"]}


def test_typescript_client_against_the_real_service(capability_service: CapabilityServiceFixture,
                                                     tmp_path: Path) -> None:
    bootstrap_typescript()
    fixture = {
        **python_results(capability_service),
        "authority": capability_service.layer.create_authority(ADMIN).id,
        "entities": {"admin": ADMIN, "alice": ALICE, "bob": BOB},
        "tokens": {role: capability_service.token_for(entity) for role, entity in
                   (("admin", ADMIN), ("alice", ALICE), ("bob", BOB))},
        "single": capability_service.mint(ALICE, default_model="tiny-sd15", max_concurrent=1),
    }
    fixture_file = tmp_path / "fixture.json"
    fixture_file.write_text(json.dumps(fixture), encoding="utf-8")
    tap = tmp_path / "node.tap"
    tests = sorted(str(path) for path in (CLIENT / "build-test" / "test").glob("*.test.js"))
    assert tests, "no compiled tests in clients/typescript/build-test/test"
    env = {**os.environ, "CAPABILITY_SERVICE_URL": capability_service.url,
           "CAPABILITY_TEST_FIXTURE": str(fixture_file)}
    completed = subprocess.run(
        ["node", "--test", "--test-reporter=spec", "--test-reporter-destination=stdout",
         "--test-reporter=tap", f"--test-reporter-destination={tap}", *tests],
        cwd=CLIENT, env=env, capture_output=True, text=True, timeout=NODE_TIMEOUT_S, check=False)
    output = f"{completed.stdout}{completed.stderr}"
    if completed.returncode != 0:
        pytest.fail(f"node --test exited {completed.returncode}:\n{output}", pytrace=False)
    # Exit 0 alone would also pass if the service's tests had skipped themselves.
    report = tap.read_text(encoding="utf-8")
    assert "# SKIP" not in report, f"node --test skipped tests:\n{output}"
    assert re.search(r"^# fail 0$", report, re.MULTILINE), output
    passed = re.search(r"^# pass (\d+)$", report, re.MULTILINE)
    assert passed is not None, output
    assert int(passed.group(1)) >= len(SEED_EXAMPLES) + 12, f"too few tests ran:\n{output}"
