"""``scripts/train-tiny FAMILY``: train a tiny pipeline on the captioned shapes of :mod:`workbench.shapes` (#15).

Every family trains its own real classes, the very pipeline :mod:`diffusers_backend.tiny_pipelines` builds and the
server loads: the VAE, the denoiser (UNet or transformer) and every text encoder the family has (SDXL's two
CLIPs, SD3's two CLIPs and T5, FLUX's CLIP and T5). The prompt goes through the pipeline's own ``encode_prompt``,
so the model learns from exactly the conditioning it gets when it serves.

Four stages, on the CPU, seeded, each within its time:

1. a pool of captioned images is rendered (``--pool`` of them, :func:`workbench.shapes.example`);
2. the VAE learns to reconstruct them (on 64-pixel crops: it is convolutional, and four times cheaper so), then
   the latents' mean and spread set the VAE's ``shift_factor``/``scaling_factor``, as the real models' are set;
   ``--vae-from`` reuses another family's trained VAE with the same latent channels instead;
3. the denoiser and the text encoders learn together with the family's own objective: noise prediction on the
   DDPM schedule for SD1.5 and SDXL, rectified flow (velocity, on the scheduler's shifted timesteps) for SD3 and
   FLUX. For the guided families one caption in ten is dropped (the way each pipeline encodes "no prompt": SDXL's
   zeros, SD1.5's and SD3's empty string), so classifier-free guidance has an unconditional model to push away
   from; FLUX, which samples without guidance as FLUX.1-schnell does, keeps every caption. Cosine learning rate over
   the remaining time, and an exponential moving average of the weights, which is what is saved;
4. the VAE's decoder alone is refined (``--decoder-minutes``), the encoder frozen so that the latents the
   denoiser learnt stay what they were, with a learning rate that decays to zero. Stage 2 ends on whatever
   iterate its constant rate last reached, and that decoder turns reds orange and purples blue; the real
   models' VAEs were refined the same way (Stability AI's sd-vae-ft-mse fine-tuned only the decoder of SD's VAE,
   to stay compatible with the trained UNet). ``--refine`` runs this stage alone on a trained weights file.

Written to ``--out``: ``loss.jsonl`` (the loss curve), ``pipeline/`` (``save_pretrained``, for a look with
diffusers) and ``FAMILY.safetensors``, the trained parameters in half precision with the VAE's factors in its
metadata: the file :mod:`diffusers_backend.tiny_pipelines` loads. ``--install`` copies it there.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import shapes

CAPTION_DROPOUT = 0.1
VAE_CROP = 64
EMA_DECAY = 0.995
WARMUP_STEPS = 50
OFFSET_NOISE = 0.1
MIN_SNR_GAMMA = 5.0
"""SD1.5's and SDXL's noise schedules never quite destroy the image (the last step keeps about 7 % of it), so a
model trained on plain Gaussian noise learns to read an image's overall colour from the noise's own mean, which
at sampling time is random: the backgrounds come out tinted. Noise that is partly constant over each latent
channel ("offset noise", N. Guttenberg, crosslabs.org, 2023) makes the model set the overall colour itself."""


@dataclass
class Budget:
    """Where a training run stands in its time budget: the VAE and the denoiser share ``main_s``, the decoder's
    refinement has the rest of ``total_s``."""

    total_s: float
    main_s: float
    started: float

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def spent(self, share: float = 1.0) -> bool:
        """Whether ``share`` of the main stages' time has gone."""
        return self.elapsed_s >= share * self.main_s

    @property
    def over(self) -> bool:
        return self.elapsed_s >= self.total_s


def model_pixels(images: np.ndarray) -> Any:
    """uint8 images, NHWC, as the VAE takes them: a float tensor in [-1, 1], NCHW."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def render_pool(count: int, size: int, seed: int) -> tuple[list[str], Any]:
    """``count`` training examples as captions and :func:`model_pixels`."""
    captions, images = [], []
    for index in range(count):
        caption, image = shapes.example(index, size, seed)
        captions.append(caption)
        images.append(image)
    return captions, model_pixels(np.stack(images))


def random_crops(pixels: Any, batch_size: int, generator: Any) -> Any:
    """``batch_size`` images of the pool, all cropped to the same random VAE_CROP-pixel square."""
    import torch

    chosen = torch.randint(0, pixels.shape[0], (batch_size,), generator=generator)
    top, left = (int(value) for value in torch.randint(0, pixels.shape[-1] - VAE_CROP + 1, (2,), generator=generator))
    return pixels[chosen, :, top:top + VAE_CROP, left:left + VAE_CROP]


class Progress:
    """A progress line on stderr and the loss curve as JSON lines."""

    def __init__(self, path: Path, budget: Budget) -> None:
        self.curve = path.open("w", encoding="utf-8")
        self.budget = budget

    def __call__(self, stage: str, step: int, loss: float) -> None:
        elapsed = self.budget.elapsed_s
        self.curve.write(json.dumps({"stage": stage, "step": step, "elapsed_s": round(elapsed, 1),
                                     "loss": round(loss, 5)}) + "\n")
        self.curve.flush()
        done = min(1.0, elapsed / self.budget.total_s)
        bar = "#" * int(done * 30)
        print(f"\r[{bar:<30}] {done:4.0%} {stage:<8} step {step:5d} loss {loss:.4f} "
              f"{elapsed / 60:5.1f}/{self.budget.total_s / 60:g} min", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr)
        self.curve.close()


def warm_cosine(step: int, done: float) -> float:
    """The learning rate's factor: a linear warm-up over WARMUP_STEPS, then a cosine decay that reaches zero when
    ``done`` (the share of the stage's time gone) reaches 1."""
    return min(1.0, (step + 1) / WARMUP_STEPS) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def train_vae(vae: Any, pixels: Any, budget: Budget, *, share: float, batch_size: int, generator: Any,
              progress: Progress) -> None:
    """Reconstruction (with a small KL term that keeps the latents near a unit Gaussian) on random crops."""
    import torch

    vae.train()
    optimiser = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    step = 0
    while not budget.spent(share):
        crop = random_crops(pixels, batch_size, generator)
        posterior = vae.encode(crop).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = torch.nn.functional.mse_loss(reconstruction, crop) + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        step += 1
        if step % 10 == 0:
            progress("vae", step, loss.item())
    vae.eval().requires_grad_(False)


def refine_decoder(vae: Any, pixels: Any, budget: Budget, *, batch_size: int, learning_rate: float,
                   generator: Any, progress: Progress) -> int:
    """Stage 4: fit the decoder to the frozen encoder's latents with a cosine-decayed rate; returns the steps.

    Measured on SD1.5's tiny VAE (10 minutes, one core): its data set's held-out images through the VAE alone
    kept the caption's colour for 36.8 % of captions after a constant rate, 100 % after a decayed one.
    """
    import torch

    # SD3's and FLUX's VAEs have no post_quant_conv.
    decoder = [module for module in (vae.decoder, vae.post_quant_conv) if module is not None]
    parameters = [parameter for module in decoder for parameter in module.parameters()]
    vae.requires_grad_(False)
    for module in decoder:
        module.train().requires_grad_(True)
    optimiser = torch.optim.AdamW(parameters, lr=learning_rate)
    started, step = budget.elapsed_s, 0
    while not budget.over:
        done = (budget.elapsed_s - started) / max(1e-9, budget.total_s - started)
        for group in optimiser.param_groups:
            group["lr"] = learning_rate * warm_cosine(step, done)
        crop = random_crops(pixels, batch_size, generator)
        with torch.no_grad():
            # Samples, not means, as stage 2 decoded: the denoiser's latents are never exactly the encoder's.
            latents = vae.encode(crop).latent_dist.sample(generator)
        loss = torch.nn.functional.mse_loss(vae.decode(latents).sample, crop)
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        step += 1
        if step % 10 == 0:
            progress("decoder", step, loss.item())
    vae.eval().requires_grad_(False)
    return step


def encode_pool(vae: Any, pixels: Any, uses_shift: bool, *, keep_factors: bool = False) -> Any:
    """The pool's latents (the posterior means), normalised as the pipelines expect; sets the VAE's factors from
    them, or with ``keep_factors`` uses those it has (a denoiser trained on them goes on training)."""
    import torch

    with torch.no_grad():
        means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(64)])
    if keep_factors:
        shift = float(vae.config.shift_factor) if uses_shift else 0.0
        scale = float(vae.config.scaling_factor)
    else:
        shift = float(means.mean()) if uses_shift else 0.0
        scale = 1.0 / float((means - shift).std())
        vae.register_to_config(scaling_factor=scale, **({"shift_factor": shift} if uses_shift else {}))
    return (means - shift) * scale


# --- the families' objectives -------------------------------------------------------------------------------------

Objective = Callable[[Any, Any, list[str], Any], Any]
"""(pipeline, clean latents, captions, generator) -> loss."""


def _dropped(captions: list[str], generator: Any) -> tuple[list[str], Any]:
    import torch

    keep = torch.rand(len(captions), generator=generator) >= CAPTION_DROPOUT
    return [caption if kept else "" for caption, kept in zip(captions, keep.tolist(), strict=True)], keep


def _noise_prediction_loss(pipeline: Any, latents: Any, generator: Any, **unet_inputs: Any) -> Any:
    import torch
    from diffusers import DDPMScheduler

    # The training-time forward process of the family's beta schedule (PNDM and Euler sample from the same one).
    schedule = DDPMScheduler.from_config(pipeline.scheduler.config)  # type: ignore[no-untyped-call]
    noise = torch.randn(latents.shape, generator=generator)
    noise += OFFSET_NOISE * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
    timesteps = torch.randint(0, schedule.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    noisy = schedule.add_noise(latents, noise, timesteps)
    predicted = pipeline.unet(noisy, timesteps, **unet_inputs).sample
    # Min-SNR weighting (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", 2023): noise
    # prediction is easiest where there is most noise, yet that is where a picture's colours and layout are
    # decided, and where a caption matters most; capping the weight of the nearly clean steps at gamma/SNR makes
    # training spend its steps there.
    alphas = schedule.alphas_cumprod[timesteps]
    signal_to_noise = alphas / (1 - alphas)
    weights = torch.clamp(signal_to_noise, max=MIN_SNR_GAMMA) / signal_to_noise
    errors = torch.nn.functional.mse_loss(predicted, noise, reduction="none").mean(dim=(1, 2, 3))
    return (weights * errors).mean()


def _flow_sample(pipeline: Any, latents: Any, generator: Any) -> tuple[Any, Any, Any]:
    """Noisy latents, their sigmas and the velocity target of rectified flow, sigmas as the scheduler shifts them."""
    import torch

    # Logit-normal timesteps (the SD3 paper's choice), then the scheduler's own shift, so that training sees the
    # noise levels sampling visits.
    uniform = torch.sigmoid(torch.randn(latents.shape[0], generator=generator))
    shift = float(pipeline.scheduler.config.shift)
    sigmas = shift * uniform / (1 + (shift - 1) * uniform)
    noise = torch.randn(latents.shape, generator=generator)
    expanded = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - expanded) * latents + expanded * noise
    return noisy, sigmas, noise - latents


def sd15_objective(pipeline: Any, latents: Any, captions: list[str], generator: Any) -> Any:
    captions, _ = _dropped(captions, generator)
    prompt_embeds, _ = pipeline.encode_prompt(captions, "cpu", 1, False)
    return _noise_prediction_loss(pipeline, latents, generator, encoder_hidden_states=prompt_embeds)


def sdxl_objective(pipeline: Any, latents: Any, captions: list[str], generator: Any) -> Any:
    import torch

    _, keep = _dropped(captions, generator)
    prompt_embeds, _, pooled, _ = pipeline.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    # With no negative prompt SDXL's unconditional input is zeros (force_zeros_for_empty_prompt).
    keep = keep.float()
    prompt_embeds = prompt_embeds * keep.view(-1, 1, 1)
    pooled = pooled * keep.view(-1, 1)
    side = latents.shape[-1] * pipeline.vae_scale_factor
    time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=latents.dtype).repeat(latents.shape[0], 1)
    return _noise_prediction_loss(pipeline, latents, generator, encoder_hidden_states=prompt_embeds,
                                  added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})


def sd3_objective(pipeline: Any, latents: Any, captions: list[str], generator: Any) -> Any:
    import torch

    from diffusers_backend.tiny import TINY_T5_SEQUENCE_LENGTH

    captions, _ = _dropped(captions, generator)
    prompt_embeds, _, pooled, _ = pipeline.encode_prompt(
        captions, captions, captions, device="cpu", do_classifier_free_guidance=False,
        max_sequence_length=TINY_T5_SEQUENCE_LENGTH)
    noisy, sigmas, target = _flow_sample(pipeline, latents, generator)
    predicted = pipeline.transformer(hidden_states=noisy, timestep=sigmas * 1000, encoder_hidden_states=prompt_embeds,
                                     pooled_projections=pooled).sample
    return torch.nn.functional.mse_loss(predicted, target)


def flux_objective(pipeline: Any, latents: Any, captions: list[str], generator: Any) -> Any:
    import torch

    from diffusers_backend.tiny import TINY_T5_SEQUENCE_LENGTH

    # FLUX.1-schnell samples without classifier-free guidance: every caption is kept.
    prompt_embeds, pooled, text_ids = pipeline.encode_prompt(
        captions, captions, device="cpu",
        max_sequence_length=TINY_T5_SEQUENCE_LENGTH)
    noisy, sigmas, target = _flow_sample(pipeline, latents, generator)
    batch, channels, height, width = latents.shape
    image_ids = pipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", latents.dtype)
    predicted = pipeline.transformer(
        hidden_states=pipeline._pack_latents(noisy, batch, channels, height, width), timestep=sigmas, guidance=None,
        pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=image_ids,
    ).sample
    return torch.nn.functional.mse_loss(predicted, pipeline._pack_latents(target, batch, channels, height, width))


OBJECTIVES: dict[str, Objective] = {
    "sd15": sd15_objective, "sdxl": sdxl_objective, "sd3": sd3_objective, "flux": flux_objective,
}
FAMILIES = tuple(OBJECTIVES)


def trained_modules(pipeline: Any) -> dict[str, Any]:
    """The denoiser and every text encoder: what stage 3 trains."""
    import torch

    return {name: module for name, module in pipeline.components.items()
            if isinstance(module, torch.nn.Module) and name != "vae"}


def train(family: str, out: Path, minutes: float, *, size: int, batch_size: int, pool: int, seed: int,
          vae_share: float, vae_from: Path | None, learning_rate: float, decoder_minutes: float,
          refine: Path | None = None, init: Path | None = None) -> Path:
    """Train ``family`` for ``minutes``, then refine its decoder for ``decoder_minutes``; or, given ``refine`` (a
    trained weights file), only the latter. Given ``init`` (a trained weights file), stage 3 starts from its
    denoiser and text encoders and keeps its VAE. Returns the weights file written into ``out``."""
    import torch

    from diffusers_backend.tiny_pipelines import build_tiny_pipeline, load_tiny_weights, save_tiny_weights

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    pipeline = build_tiny_pipeline(family, trained=False)
    out.mkdir(parents=True, exist_ok=True)
    main_minutes = 0.0 if refine is not None else minutes
    budget = Budget((main_minutes + decoder_minutes) * 60, main_minutes * 60, time.monotonic())
    progress = Progress(out / "loss.jsonl", budget)

    captions, pixels = render_pool(pool, size, seed)
    if refine is not None:
        load_tiny_weights(pipeline, refine)
        metadata = weights_metadata(refine)
    else:
        metadata = {}
        if init is not None:
            load_tiny_weights(pipeline, init)
            metadata = {f"init_{key}": value for key, value in weights_metadata(init).items()
                        if key in ("steps", "minutes", "seed")}
        metadata.update({"steps": str(train_main(pipeline, family, captions, pixels, budget, batch_size=batch_size,
                                                 vae_share=vae_share, vae_from=vae_from, vae_trained=init is not None,
                                                 learning_rate=learning_rate, generator=generator,
                                                 progress=progress)),
                         "minutes": f"{minutes:g}", "seed": str(seed)})
    decoder_steps = refine_decoder(pipeline.vae, pixels, budget, batch_size=batch_size, learning_rate=1e-3,
                                   generator=generator, progress=progress)
    progress.close()
    metadata.update({"decoder_steps": str(decoder_steps), "decoder_minutes": f"{decoder_minutes:g}"})
    pipeline.save_pretrained(out / "pipeline", safe_serialization=True)
    weights = out / f"{family}.safetensors"
    save_tiny_weights(pipeline, weights, metadata)
    print(f"{family}: {metadata['steps']} denoiser steps, {decoder_steps} decoder steps in "
          f"{budget.elapsed_s / 60:.1f} min; weights in {weights}", file=sys.stderr)
    return weights


def train_main(pipeline: Any, family: str, captions: list[str], pixels: Any, budget: Budget, *, batch_size: int,
               vae_share: float, vae_from: Path | None, learning_rate: float, generator: Any,
               progress: Progress, vae_trained: bool = False) -> int:
    """Stages 2 and 3 within ``budget.main_s``: the VAE (unless ``vae_trained``: it is kept as it is), then the
    denoiser and text encoders, whose exponential moving averages replace them in ``pipeline``. Returns the
    denoiser's steps."""
    import torch

    from diffusers_backend.tiny_pipelines import build_tiny_pipeline

    uses_shift = "shift_factor" in pipeline.vae.config and pipeline.vae.config.shift_factor is not None
    if vae_trained:
        pipeline.vae.eval().requires_grad_(False)
    elif vae_from is not None:
        donor = build_tiny_pipeline(family, trained=False)
        load_vae_from(donor, vae_from)
        pipeline.vae.load_state_dict(donor.vae.state_dict())
        pipeline.vae.eval().requires_grad_(False)
    else:
        train_vae(pipeline.vae, pixels, budget, share=vae_share, batch_size=batch_size, generator=generator,
                  progress=progress)
    latents = encode_pool(pipeline.vae, pixels, uses_shift, keep_factors=vae_trained)

    modules = trained_modules(pipeline)
    parameters = [parameter for module in modules.values() for parameter in module.parameters()]
    for module in modules.values():
        module.train()
    averages = {name: copy.deepcopy(module).eval().requires_grad_(False) for name, module in modules.items()}
    optimiser = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    objective = OBJECTIVES[family]
    pool = len(captions)
    denoiser_started = budget.elapsed_s
    step = 0
    while not budget.spent():
        done = (budget.elapsed_s - denoiser_started) / max(1e-9, budget.main_s - denoiser_started)
        for group in optimiser.param_groups:
            group["lr"] = learning_rate * warm_cosine(step, done)
        chosen = torch.randint(0, pool, (batch_size,), generator=generator)
        loss = objective(pipeline, latents[chosen], [captions[int(index)] for index in chosen], generator)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        with torch.no_grad():
            decay = min(EMA_DECAY, (1 + step) / (10 + step))
            for name, module in modules.items():
                for average, current in zip(averages[name].parameters(), module.parameters(), strict=True):
                    average.lerp_(current, 1 - decay)
        step += 1
        if step % 10 == 0:
            progress(family, step, loss.item())
    for name, average in averages.items():
        pipeline.register_modules(**{name: average})
    return step


def weights_metadata(weights: Path) -> dict[str, str]:
    """The training facts (steps, minutes, seed) a weights file carries, without the VAE's factors."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as opened:
        metadata = opened.metadata() or {}
    return {key: value for key, value in metadata.items() if not key.startswith("vae.")}


def load_vae_from(pipeline: Any, weights: Path) -> None:
    """Load only the VAE (and its factors) of a trained family's weights file into ``pipeline``."""
    from diffusers_backend.tiny_pipelines import load_tiny_weights

    load_tiny_weights(pipeline, weights, components=("vae",))





def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/train-tiny", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("--out", type=Path, required=True, help="folder for the weights, the loss curve, the pipeline")
    parser.add_argument("--minutes", type=float, default=20.0,
                        help="time for the VAE and the denoiser (default %(default)s)")
    parser.add_argument("--decoder-minutes", type=float, default=10.0,
                        help="time for the decoder's refinement, after them (default %(default)s)")
    parser.add_argument("--refine", type=Path, metavar="WEIGHTS",
                        help="a trained FAMILY.safetensors: refine its decoder only, for --decoder-minutes")
    parser.add_argument("--size", type=int, default=128, help="training images' side in pixels (default %(default)s)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default %(default)s)")
    parser.add_argument("--pool", type=int, default=4096, help="images rendered to train on (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--vae-share", type=float, default=0.25,
                        help="share of the time for the VAE (default %(default)s)")
    parser.add_argument("--vae-from", type=Path, help="a trained FAMILY.safetensors whose VAE to reuse, untrained")
    parser.add_argument("--init", type=Path, metavar="WEIGHTS",
                        help="a trained FAMILY.safetensors to go on training: its VAE kept, its denoiser and text "
                             "encoders trained for --minutes more")
    parser.add_argument("--install", action="store_true",
                        help="copy the weights to where --tiny, the demo and the tests load them from")
    arguments = parser.parse_args(argv)
    for option, path in (("--vae-from", arguments.vae_from), ("--refine", arguments.refine),
                         ("--init", arguments.init)):
        if path is not None and not path.is_file():
            parser.error(f"{option} {path} is invalid: no such file (a FAMILY.safetensors written by "
                         "scripts/train-tiny)")
    chosen = [option for option, value in (("--refine", arguments.refine), ("--init", arguments.init),
                                           ("--vae-from", arguments.vae_from)) if value is not None]
    if len(chosen) > 1:
        parser.error(f"{' and '.join(chosen)} are invalid together: --refine trains the decoder of a file, --init "
                     "goes on training a file with its own VAE, --vae-from starts afresh with another's VAE")
    if arguments.refine is not None and arguments.decoder_minutes <= 0:
        parser.error(f"--decoder-minutes {arguments.decoder_minutes:g} is invalid with --refine: the refinement "
                     "needs a time above 0")
    weights = train(arguments.family, arguments.out, arguments.minutes, size=arguments.size,
                    batch_size=arguments.batch, pool=arguments.pool, seed=arguments.seed,
                    vae_share=arguments.vae_share, vae_from=arguments.vae_from,
                    learning_rate=arguments.learning_rate, decoder_minutes=arguments.decoder_minutes,
                    refine=arguments.refine, init=arguments.init)
    if arguments.install:
        from diffusers_backend.tiny_pipelines import TRAINED_WEIGHTS

        shutil.copyfile(weights, TRAINED_WEIGHTS / weights.name)
        print(f"installed {TRAINED_WEIGHTS / weights.name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
