"""``scripts/eval-tiny``: how well the tiny models draw what a caption asks, through the real server (#15).

Starts tritonserver with the tiny repository, renders the held-out captions of :mod:`workbench.shapes` (never
trained on) with a few seeds through each tiny model, at the model's defaults (size, steps, guidance) unless told
otherwise, and scores every image with the classifier of :mod:`workbench.shapes`: is the shape's colour the
caption's, is its outline the caption's shape. Prints one line per family, writes ``scores.json`` and one contact
sheet per family (``tiny-FAMILY.png``, the images in caption order, a row per seed) to ``--out``. Below each
family's line, the same scores of the data set's own images passed through the family's VAE alone: about the most
the model can score (:func:`vae_round_trip`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inference_client import contract

from . import shapes
from .train_tiny import model_pixels

FAMILIES = ("sd15", "sdxl", "sd3", "flux")
DEFAULT_SEEDS = (0, 1)


@dataclass
class Scores:
    """One model's results on a set of captions."""

    model: str
    images: int = 0
    colours_right: int = 0
    shapes_right: int = 0
    mean_colour_share: float = 0.0
    """The mean share of each image's pixels near its caption's colour."""
    mistakes: list[str] = field(default_factory=list)

    @property
    def colour_accuracy(self) -> float:
        return self.colours_right / self.images if self.images else 0.0

    @property
    def shape_accuracy(self) -> float:
        return self.shapes_right / self.images if self.images else 0.0

    def report(self) -> dict[str, Any]:
        """The fields and both accuracies, as ``scores.json`` holds them."""
        return {**asdict(self), "colour_accuracy": self.colour_accuracy, "shape_accuracy": self.shape_accuracy}

    def line(self) -> str:
        return (f"{self.model:<10} colours {self.colour_accuracy:6.1%}  shapes {self.shape_accuracy:6.1%}  "
                f"colour share {self.mean_colour_share:5.3f}  ({self.images} images)")


class Renderer:
    """Sends captions to a tiny model over HTTP, ``concurrency`` at a time (the tiny models have as many
    instances as the machine has cores to share), and returns each image as an RGB uint8 array.

    One HTTP client per thread: tritonclient's HTTP client is not meant to be shared between threads.
    """

    def __init__(self, server: Any, concurrency: int = 2) -> None:
        from inference_client import triton

        self.server = server
        self.triton = triton
        self._local = threading.local()
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="eval-tiny")

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self.server.http_client(timeout_s=300)
            with self._clients_lock:
                self._clients.append(client)
        return client

    def render(self, model: str, caption: str, seed: int, **options: Any) -> np.ndarray:
        request = contract.TextToImage(caption, seed=seed, **options)
        result = self._client().infer(model, self.triton.http_inputs(request), outputs=self.triton.http_outputs(),
                                      headers=self.server.headers)
        image: np.ndarray = contract.read_result(result).image
        return image

    def render_all(self, model: str, jobs: Sequence[tuple[str, int]], **options: Any) -> list[np.ndarray]:
        """The images of ``jobs`` (caption, seed), in their order."""
        return list(self._pool.map(lambda job: self.render(model, job[0], job[1], **options), jobs))

    def close(self) -> None:
        self._pool.shutdown()
        for client in self._clients:
            client.close()


def score(render: Renderer, model: str, scenes: Sequence[shapes.Scene], seeds: Sequence[int],
          **options: Any) -> tuple[Scores, list[list[np.ndarray]]]:
    """``model``'s scores on ``scenes`` drawn with each of ``seeds``, and the images (a row per seed)."""
    scores = Scores(model)
    images = iter(render.render_all(model, [(scene.caption, seed) for seed in seeds for scene in scenes], **options))
    rows: list[list[np.ndarray]] = []
    shares = []
    for seed in seeds:
        row = []
        for scene in scenes:
            image = next(images)
            row.append(image)
            shares.append(_tally(scores, scene, image, f"seed {seed}"))
        rows.append(row)
    scores.mean_colour_share = float(np.mean(shares)) if shares else 0.0
    return scores, rows


def _tally(scores: Scores, scene: shapes.Scene, image: np.ndarray, label: str) -> float:
    """Judge ``image`` against ``scene`` into ``scores``; return its share of the caption's colour."""
    judgement = shapes.judge(image, scene.colour)
    scores.images += 1
    scores.colours_right += judgement.colour == scene.colour
    scores.shapes_right += judgement.shape == scene.shape
    if (judgement.colour, judgement.shape) != (scene.colour, scene.shape):
        scores.mistakes.append(f"{label}: {scene.caption!r} drawn as {judgement.colour} {judgement.shape}")
    return judgement.colour_share


def vae_round_trip(family: str, scenes: Sequence[shapes.Scene], *, trained: bool = True, seed: int = 0) -> Scores:
    """The scores of the data set's own images of ``scenes`` once the family's VAE has encoded and decoded them.

    What the judge makes of a perfect denoiser's output, roughly the most the model can score. Before their
    decoders were refined (scripts/train-tiny's fourth stage) the tiny VAEs shifted some colours to the palette's
    next hue (red to orange, purple to blue), and tiny-sd15's and tiny-sd3's colour scores were their VAEs'.
    """
    import torch

    from diffusers_backend.tiny import TINY_NATIVE_SIZE
    from diffusers_backend.tiny_pipelines import build_tiny_pipeline
    from triton_launcher.repository import TINY_PREFIX

    vae = build_tiny_pipeline(family, trained=trained).vae
    rng = np.random.default_rng(seed)
    originals = np.stack([shapes.render(scene, TINY_NATIVE_SIZE, rng) for scene in scenes])
    pixels = model_pixels(originals)
    with torch.no_grad():
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1.0, 1.0)
    images = ((decoded.permute(0, 2, 3, 1).numpy() + 1.0) * 127.5).round().astype(np.uint8)
    scores = Scores(TINY_PREFIX + family)
    shares = [_tally(scores, scene, image, "through the VAE") for scene, image in zip(scenes, images, strict=True)]
    scores.mean_colour_share = float(np.mean(shares)) if shares else 0.0
    return scores


def contact_sheet(rows: list[list[np.ndarray]], gap: int = 4) -> np.ndarray:
    """The images on a grid, a row per seed, with a ``gap``-pixel white margin."""
    height, width = rows[0][0].shape[:2]
    columns = max(len(row) for row in rows)
    sheet = np.full((gap + len(rows) * (height + gap), gap + columns * (width + gap), 3), 255, dtype=np.uint8)
    for row_index, row in enumerate(rows):
        for column_index, image in enumerate(row):
            top, left = gap + row_index * (height + gap), gap + column_index * (width + gap)
            sheet[top:top + height, left:left + width] = image
    return sheet


def write_png(path: Path, image: np.ndarray) -> None:
    from capability.png import encode_png

    path.write_bytes(encode_png(image))


def main(argv: list[str] | None = None) -> int:
    from triton_launcher.repository import TINY_PREFIX, build_tiny_repository
    from triton_launcher.server import TritonServer, loopback_options

    parser = argparse.ArgumentParser(prog="scripts/eval-tiny", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("families", nargs="*", metavar="FAMILY",
                        help=f"families to evaluate, of {', '.join(FAMILIES)} (default: all)")
    parser.add_argument("--out", type=Path, default=Path("out/eval"), help="folder for scores.json and the sheets")
    parser.add_argument("--seeds", type=int, default=len(DEFAULT_SEEDS), help="seeds per caption (default 2)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: each model's own)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: each model's own)")
    parser.add_argument("--all-captions", action="store_true",
                        help="every caption, trained on or not (default: the held-out ones only)")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    families = arguments.families or list(FAMILIES)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown family {', '.join(unknown)}: the families are {', '.join(FAMILIES)}")
    if arguments.seeds < 1:
        parser.error(f"--seeds {arguments.seeds} is invalid: at least one seed")
    scenes = shapes.all_scenes() if arguments.all_captions else shapes.evaluation_scenes()
    seeds = list(range(arguments.seeds))
    options = {key: value for key, value in (("guidance_scale", arguments.guidance),
                                             ("num_inference_steps", arguments.steps)) if value is not None}
    arguments.out.mkdir(parents=True, exist_ok=True)
    repository = build_tiny_repository(families=families, streaming=())
    results = {}
    with tempfile.TemporaryDirectory(prefix="eval-tiny-") as state_dir, \
            TritonServer(loopback_options(repository, Path(state_dir), ready_timeout_s=300)) as server:
        render = Renderer(server)
        try:
            for family in families:
                model = TINY_PREFIX + family
                scores, rows = score(render, model, scenes, seeds, **options)
                write_png(arguments.out / f"{model}.png", contact_sheet(rows))
                ceiling = vae_round_trip(family, scenes)
                results[model] = {**scores.report(), "vae_round_trip": ceiling.report()}
                print(scores.line(), flush=True)
                print(f"{'':<10} the data through its VAE alone: colours {ceiling.colour_accuracy:6.1%}  "
                      f"shapes {ceiling.shape_accuracy:6.1%}", flush=True)
        finally:
            render.close()
    report = {"captions": [scene.caption for scene in scenes], "seeds": seeds, "options": options,
              "models": results}
    (arguments.out / "scores.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"scores and contact sheets in {arguments.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
