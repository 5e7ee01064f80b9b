"""scripts/train-tiny's last stage, the decoder's refinement: the encoder, and so the latents the denoiser learnt,
must not move; going on training a trained file (``--init``): its VAE must not move; and the command line's
errors."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from diffusers_backend.tiny_pipelines import build_tiny_pipeline  # noqa: E402
from workbench import train_tiny  # noqa: E402


class _Silent:
    def __call__(self, stage: str, step: int, loss: float) -> None:
        pass


def _parameters(*modules: Any) -> dict[str, Any]:
    # SD3's and FLUX's VAEs have neither quant_conv nor post_quant_conv.
    return {f"{index}.{name}": parameter.detach().clone() for index, module in enumerate(modules)
            if module is not None for name, parameter in module.named_parameters()}


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_refining_the_decoder_leaves_the_encoder_and_its_latents_as_they_were(family: str) -> None:
    vae = build_tiny_pipeline(family).vae
    _, pixels = train_tiny.render_pool(4, 64, seed=0)
    encoder_before = _parameters(vae.encoder, vae.quant_conv)
    decoder_before = _parameters(vae.decoder, vae.post_quant_conv)
    with torch.no_grad():
        latents_before = vae.encode(pixels).latent_dist.mean
    # The loop runs until its time is spent, so give it a second and no main stages.
    budget = train_tiny.Budget(total_s=1.0, main_s=0.0, started=time.monotonic())

    steps = train_tiny.refine_decoder(vae, pixels, budget, batch_size=2, learning_rate=1e-3,
                                      generator=torch.Generator().manual_seed(0),
                                      progress=_Silent())  # type: ignore[arg-type]

    assert steps >= 1
    encoder_after = _parameters(vae.encoder, vae.quant_conv)
    assert all(torch.equal(encoder_before[name], encoder_after[name]) for name in encoder_before)
    with torch.no_grad():
        assert torch.equal(vae.encode(pixels).latent_dist.mean, latents_before)
    decoder_after = _parameters(vae.decoder, vae.post_quant_conv)
    assert any(not torch.equal(decoder_before[name], decoder_after[name]) for name in decoder_before)
    assert not vae.training
    assert not any(parameter.requires_grad for parameter in vae.parameters())


@pytest.mark.parametrize("option", ["--refine", "--vae-from", "--init"])
def test_a_weights_file_that_is_not_there_is_refused_by_name(option: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "sd15.safetensors"
    with pytest.raises(SystemExit) as exited:
        train_tiny.main(["sd15", "--out", str(tmp_path / "out"), option, str(missing)])

    assert exited.value.code == 2
    assert f"{option} {missing} is invalid: no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_going_on_training_keeps_the_vae_and_its_factors_and_trains_the_denoiser(tmp_path: Path) -> None:
    from diffusers_backend.tiny_pipelines import load_tiny_weights, save_tiny_weights

    trained = build_tiny_pipeline("sd15", trained=False)
    trained.vae.register_to_config(scaling_factor=0.25)  # not what this pool's latents would give
    init = tmp_path / "sd15.safetensors"
    save_tiny_weights(trained, init, {"steps": "1234", "minutes": "40", "seed": "0"})

    # Six seconds of stage 3 (less what loading takes) and no decoder stage: the loop runs until its time is spent.
    weights = train_tiny.train("sd15", tmp_path / "out", 0.1, size=64, batch_size=2, pool=4, seed=1,
                               vae_share=0.25, vae_from=None, learning_rate=1e-3, decoder_minutes=0, init=init)

    before, after = build_tiny_pipeline("sd15", trained=False), build_tiny_pipeline("sd15", trained=False)
    load_tiny_weights(before, init)
    load_tiny_weights(after, weights)
    vae_before, vae_after = _parameters(before.vae), _parameters(after.vae)
    assert all(torch.equal(vae_before[name], vae_after[name]) for name in vae_before)
    assert after.vae.config.scaling_factor == 0.25
    unet_before, unet_after = _parameters(before.unet), _parameters(after.unet)
    assert any(not torch.equal(unet_before[name], unet_after[name]) for name in unet_before)
    metadata = train_tiny.weights_metadata(weights)
    assert (metadata["init_steps"], metadata["init_minutes"]) == ("1234", "40")
    assert int(metadata["steps"]) >= 1


def test_init_with_another_starting_point_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "sd15.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(SystemExit):
        train_tiny.main(["sd15", "--out", str(tmp_path / "out"), "--init", str(weights), "--vae-from", str(weights)])

    assert "--init and --vae-from are invalid together" in capsys.readouterr().err


def test_refining_for_no_time_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "sd15.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(SystemExit):
        train_tiny.main(["sd15", "--out", str(tmp_path / "out"), "--refine", str(weights), "--decoder-minutes", "0"])

    assert "--decoder-minutes 0 is invalid with --refine" in capsys.readouterr().err


def test_the_learning_rate_warms_up_then_decays_to_zero_as_the_time_runs_out() -> None:
    warm_up = train_tiny.WARMUP_STEPS
    assert train_tiny.warm_cosine(0, 0.0) == pytest.approx(1 / warm_up)
    assert train_tiny.warm_cosine(warm_up - 1, 0.0) == pytest.approx(1.0)
    assert train_tiny.warm_cosine(10 * warm_up, 0.5) == pytest.approx(0.5)
    assert train_tiny.warm_cosine(10 * warm_up, 1.0) == pytest.approx(0.0)
    assert train_tiny.warm_cosine(10 * warm_up, 1.5) == pytest.approx(0.0)  # a step that starts after the time
