"""``scripts/demo``: serve the tiny models and show the whole system.

An operator mints a capability and gives it to alice, who generates one image per family through the
capability layer (Triton over HTTP underneath); she delegates a narrower one to bob, whose use inside his
limits succeeds and outside them is refused. PNGs go to ``--out``; the server stops at the end.
"""

from __future__ import annotations

import argparse
import base64
import logging
import sys
import tempfile
import time
from pathlib import Path

from capability import CapabilityError, CapabilityLayer, DeniedError
from triton_launcher.errors import LauncherError
from triton_launcher.repository import FAMILY_MODELS, TINY_PREFIX, build_tiny_repository
from triton_launcher.server import TritonServer, loopback_options

logger = logging.getLogger("workbench.demo")

# The tiny models were trained on captioned shapes (workbench/shapes.py), so these are what they can draw.
PROMPTS = {
    "sd15": "a red circle on a white background",
    "sdxl": "a blue square on a gray background",
    "sd3": "a yellow triangle on a black background",
    "flux": "an orange square on the right on a white background",
}
BOB_PROMPT = "a purple circle on the left on a black background"


def positive_multiple_of_16(text: str) -> int:
    value = int(text)
    if value < 16 or value % 16:
        raise argparse.ArgumentTypeError(f"{value} is invalid: must be a positive multiple of 16 (SD3 and FLUX)")
    return value


def positive_integer(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid: must be a positive integer")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for the PNGs (default: %(default)s)")
    parser.add_argument("--width", type=positive_multiple_of_16,
                        help="default: the models' own, the 128 pixels they were trained at")
    parser.add_argument("--height", type=positive_multiple_of_16, help="default: the models' own (128)")
    parser.add_argument("--steps", type=positive_integer, help="denoising steps (default: each model's own)")
    parser.add_argument("--seed", type=int, default=42, help="default: %(default)s")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    started = time.monotonic()
    repository = build_tiny_repository()
    arguments.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="triton-demo-") as state_dir:
        options = loopback_options(repository, Path(state_dir))
        try:
            with TritonServer(options) as server, CapabilityLayer(Path(state_dir)) as layer:
                logger.info("server ready at %s after %.1f s", server.url, time.monotonic() - started)
                run_demo(layer, server.url, arguments)
        except (LauncherError, CapabilityError) as error:
            print(f"scripts/demo: {error}", file=sys.stderr)
            return 1
    print(f"wrote {len(FAMILY_MODELS) + 1} images to {arguments.out.resolve()}")
    return 0


def run_demo(layer: CapabilityLayer, server_url: str, arguments: argparse.Namespace) -> None:
    """The whole system in a few steps: an operator mints, alice generates, bob gets a narrower share."""
    authority = layer.create_authority("operator")
    alice_cap = layer.mint("operator", authority.id, {
        "server_url": server_url, "default_model": "tiny-sd15", "max_concurrent": 2,
    }).give("alice")
    print(f"operator minted {alice_cap.id} (every model at {server_url}) and gave it to alice")
    chosen = {key: value for key, value in (("width", arguments.width), ("height", arguments.height),
                                            ("numInferenceSteps", arguments.steps)) if value is not None}
    for family in FAMILY_MODELS:
        model = TINY_PREFIX + family
        begun = time.monotonic()
        result = alice_cap.text_to_image(PROMPTS[family], {"modelId": model, "seed": arguments.seed, **chosen})
        path = arguments.out / f"{model}.png"
        path.write_bytes(base64.b64decode(result["image"]))
        print(f"{path}  {result['width']}x{result['height']}  seed {result['seed']}  "
              f"{time.monotonic() - begun:.2f} s  {PROMPTS[family]!r}", flush=True)

    # The same request on the streaming variant: progress after every step, then the very same image.
    steps_reported: list[int] = []
    streamed = alice_cap.text_to_image(PROMPTS["sd15"], {"modelId": "tiny-sd15", "seed": arguments.seed, **chosen},
                                       on_progress=lambda progress: steps_reported.append(progress.steps_done))
    same = streamed["image"] == base64.b64encode((arguments.out / "tiny-sd15.png").read_bytes()).decode()
    print(f"alice watched tiny-sd15 again with progress: steps {steps_reported[0]}..{steps_reported[-1]} reported, "
          f"{'the same' if same else 'a different'} image")

    bob_cap = alice_cap.delegate({"allowed_models": ["tiny-sdxl"], "max_width": 256, "max_height": 256,
                                  "max_steps": 25}).give("bob")
    print(f"alice delegated {bob_cap.id} (tiny-sdxl only, up to 256x256, 25 steps) and gave it to bob")
    result = bob_cap.text_to_image(BOB_PROMPT, {"width": 128, "height": 128, "numInferenceSteps": 25,
                                               "seed": arguments.seed})
    path = arguments.out / "bob-tiny-sdxl.png"
    path.write_bytes(base64.b64decode(result["image"]))
    print(f"bob generated {path} {result['width']}x{result['height']} with {result['model']}  {BOB_PROMPT!r}")
    for options in ({"modelId": "tiny-flux", "width": 128, "height": 128, "numInferenceSteps": 4},
                    {"width": 512, "height": 512, "numInferenceSteps": 4}):
        try:
            bob_cap.text_to_image(BOB_PROMPT, options)
        except DeniedError as refusal:
            print(f"bob refused, as he should be: {refusal}")


if __name__ == "__main__":
    sys.exit(main())
