"""``scripts/train-tiny FAMILY``: train a tiny pipeline on the captioned shapes of :mod:`workbench.shapes` (#15).

First step, SD1.5 only: the family's real classes (the tiny pipeline of :mod:`diffusers_backend.tiny_pipelines`),
trained on the CPU in two stages within a time budget: the VAE as an autoencoder of the shapes, then the UNet and
the CLIP text encoder on the frozen VAE's latents with the family's own noise schedule and epsilon objective
(captions dropped one time in ten, for classifier-free guidance). Seeded; a progress line on stderr; the loss
curve (``loss.jsonl``) and the pipeline (``save_pretrained``) in ``--out``.

Not yet done (the issue's later steps): SDXL, SD3 and FLUX, half-precision weights in the repository, the
launcher's ``--tiny`` using them, the evaluation through the server.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import shapes

FAMILIES = ("sd15",)
CAPTION_DROPOUT = 0.1
VAE_SHARE = 0.3
"""Of the time budget, the share spent on the VAE before the denoiser."""


def batch(start: int, count: int, size: int, seed: int) -> tuple[list[str], Any]:
    """``count`` examples from ``start`` as captions and a float tensor in [-1, 1], NCHW."""
    import torch

    captions, images = [], []
    for index in range(start, start + count):
        caption, image = shapes.example(index, size, seed)
        captions.append(caption)
        images.append(image)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return captions, pixels


def train(family: str, out: Path, minutes: float, *,  # noqa: PLR0915 - the two stages read best in one piece
          size: int = 64, batch_size: int = 16, seed: int = 0) -> None:
    import torch

    from diffusers_backend.tiny_pipelines import build_tiny_pipeline

    if family not in FAMILIES:
        raise SystemExit(f"train-tiny: {family!r} cannot be trained yet; the families so far: {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    pipeline = build_tiny_pipeline(family)
    vae, unet, text_encoder, tokenizer = pipeline.vae, pipeline.unet, pipeline.text_encoder, pipeline.tokenizer
    scheduler = pipeline.scheduler
    out.mkdir(parents=True, exist_ok=True)
    curve = (out / "loss.jsonl").open("w")
    budget_s = minutes * 60
    started = time.monotonic()
    index = 0

    def log(stage: str, step: int, loss: float) -> None:
        elapsed = time.monotonic() - started
        curve.write(json.dumps({"stage": stage, "step": step, "elapsed_s": round(elapsed, 1), "loss": loss}) + "\n")
        curve.flush()
        print(f"\r{stage} step {step}  loss {loss:.4f}  {elapsed / 60:.1f}/{minutes:g} min", end="", file=sys.stderr,
              flush=True)

    # Stage 1: the VAE reconstructs the shapes (a small KL term keeps its latents near the unit Gaussian).
    vae.train()
    optimiser = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    step = 0
    while time.monotonic() - started < VAE_SHARE * budget_s:
        _, pixels = batch(index, batch_size, size, seed)
        index += batch_size
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        step += 1
        if step % 10 == 0:
            log("vae", step, float(loss))
    vae.eval().requires_grad_(False)

    # Stage 2: the denoiser and the text encoder, on the frozen VAE's latents.
    unet.train()
    text_encoder.train()
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=5e-4)
    generator = torch.Generator().manual_seed(seed)
    step = 0
    while time.monotonic() - started < budget_s:
        captions, pixels = batch(index, batch_size, size, seed)
        index += batch_size
        captions = [("" if torch.rand((), generator=generator) < CAPTION_DROPOUT else caption) for caption in captions]
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor
        tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt").input_ids
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        predicted = unet(noisy, timesteps, encoder_hidden_states=text_encoder(tokens)[0]).sample
        loss = torch.nn.functional.mse_loss(predicted, noise)
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        step += 1
        if step % 10 == 0:
            log("denoiser", step, float(loss))
    print(file=sys.stderr)
    curve.close()
    for module in (unet, text_encoder):
        module.eval()
    pipeline.save_pretrained(out, safe_serialization=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/train-tiny", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--size", type=int, default=64, help="training images' side in pixels")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    train(arguments.family, arguments.out, arguments.minutes, size=arguments.size, batch_size=arguments.batch,
          seed=arguments.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
