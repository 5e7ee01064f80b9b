"""``scripts/demo``: serve the tiny models, generate one image per family over HTTP, write PNGs, stop."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from tritonclient.utils import InferenceServerException

from . import contract
from .errors import LauncherError
from .repository import FAMILY_MODELS, TINY_PREFIX, build_tiny_repository
from .server import TritonServer, loopback_options

logger = logging.getLogger("triton_launcher.demo")

PROMPTS = {
    "sd15": "a lighthouse on a cliff at dawn, oil painting",
    "sdxl": "a red fox in fresh snow, golden hour",
    "sd3": "a bowl of ramen on a wooden table, studio photo",
    "flux": "a paper boat on a rainy street, macro shot",
}


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
    parser.add_argument("--width", type=positive_multiple_of_16, default=256, help="default: %(default)s")
    parser.add_argument("--height", type=positive_multiple_of_16, default=256, help="default: %(default)s")
    parser.add_argument("--steps", type=positive_integer, default=4, help="denoising steps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="default: %(default)s")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    started = time.monotonic()
    repository = build_tiny_repository()
    arguments.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="triton-demo-") as state_dir:
        options = loopback_options(repository, Path(state_dir))
        try:
            with TritonServer(options) as server:
                logger.info("server ready at %s after %.1f s", server.url, time.monotonic() - started)
                with server.http_client() as client:
                    for family in FAMILY_MODELS:
                        model = TINY_PREFIX + family
                        request = contract.TextToImage(
                            PROMPTS[family], width=arguments.width, height=arguments.height,
                            num_inference_steps=arguments.steps, seed=arguments.seed,
                        )
                        begun = time.monotonic()
                        result = client.infer(model, request.http_inputs(), outputs=contract.http_outputs(),
                                              headers=server.headers)
                        generated = contract.read_result(result)
                        path = arguments.out / f"{model}.png"
                        Image.fromarray(generated.image).save(path)
                        height, width, _ = generated.image.shape
                        print(f"{path}  {width}x{height}  seed {generated.seed}  "
                              f"{time.monotonic() - begun:.2f} s", flush=True)
        except (LauncherError, InferenceServerException) as error:
            print(f"scripts/demo: {error}", file=sys.stderr)
            return 1
    print(f"wrote {len(FAMILY_MODELS)} images to {arguments.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
