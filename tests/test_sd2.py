"""SD 2.x v-prediction on the built-in tiny-sd-v: the v target, zero terminal SNR, and prediction-type detection."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_train import run, tiny_config
from torch import nn

from loha_train.config import ConfigError, ModelConfig
from loha_train.models import layout
from loha_train.models.builtin import resolve_builtin
from loha_train.models.bundle import ModelError
from loha_train.models.detect import detect_model
from loha_train.models.loading import load_models
from loha_train.models.single_file import save_single_file
from loha_train.training import step
from loha_train.training.sampling import SampleModels, make_pipeline

pytestmark = pytest.mark.usefixtures("builtin_cache", "fresh_accelerate")

V = "builtin:tiny-sd-v"


class _Predicts(nn.Module):
    """A UNet stand-in that predicts a given tensor (with the real UNet's parameters, for their dtype)."""

    def __init__(self, unet: nn.Module, prediction: torch.Tensor) -> None:
        super().__init__()
        self.unet, self.prediction = unet, prediction

    def forward(self, *args: object, **kwargs: object) -> SimpleNamespace:
        return SimpleNamespace(sample=self.prediction)


def _scaled_linear_alphas_cumprod() -> torch.Tensor:
    """alpha_bar of SD's schedule, from its published betas (not from diffusers)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


# ---------------------------------------------------------------------------------------------- the target
@pytest.mark.parametrize(("model", "zero_snr"), [(V, False), (V, True), ("builtin:tiny-sd-random", False)])
def test_the_loss_targets_v_for_v_models_and_noise_for_epsilon_models(model: str, zero_snr: bool) -> None:
    bundle = load_models(ModelConfig(path=model, zero_terminal_snr=zero_snr))
    cfg = tiny_config(Path("unused"), model__path=model, model__zero_terminal_snr=zero_snr)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    ctx = torch.randn(3, 77, bundle.unet.config.cross_attention_dim, generator=g)
    loss = step.diffusion_loss(cfg, bundle, x0, noise, t, {"encoder_hidden_states": ctx}, torch.ones(3))

    alpha_bar = bundle.noise_scheduler.alphas_cumprod.double()
    if zero_snr:
        assert alpha_bar[-1] == 0  # the last timestep is pure noise
    else:
        assert torch.allclose(alpha_bar, _scaled_linear_alphas_cumprod())
    ab = alpha_bar[t].view(-1, 1, 1, 1)
    v = ab.sqrt() * noise - (1 - ab).sqrt() * x0  # v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0
    noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    with torch.no_grad():
        pred = bundle.unet(noisy.float(), t, ctx).sample.double()
    target = v if bundle.prediction_type == "v_prediction" else noise
    assert loss.item() == pytest.approx(((pred - target) ** 2).mean().item(), rel=1e-5)
    # a model that predicts exactly the formula's target has no loss; the other target would cost about 1 per element
    for guess in (v, noise):
        oracle = dataclasses.replace(bundle, unet=_Predicts(bundle.unet, guess.float()))
        perfect = step.diffusion_loss(cfg, oracle, x0, noise, t, {"encoder_hidden_states": ctx}, torch.ones(3))
        assert (perfect.item() < 1e-10) == (guess is target), perfect.item()
    if zero_snr:
        assert torch.allclose(v[2], -x0[2].double())  # at t = T the velocity is -x0


def test_a_v_model_trains_with_the_v_target_and_exports_sd2_v_metadata(tmp_path: Path, monkeypatch) -> None:
    from diffusers import DDPMScheduler

    calls = []
    original = DDPMScheduler.get_velocity
    monkeypatch.setattr(DDPMScheduler, "get_velocity", lambda self, *a: calls.append(1) or original(self, *a))
    run(
        tmp_path,
        model__path=V,
        model__zero_terminal_snr=True,
        network__train_text_encoder=True,
        train__max_steps=3,
        train__min_snr_gamma=5.0,
        sample__prompts=["a red circle"],
        sample__sampler="ddim",
        sample__steps=2,
    )
    assert len(calls) == 3  # one v target per micro-step
    with safe_open(str(tmp_path / "loha.safetensors"), framework="pt") as f:
        stems = {k.split(".")[0] for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v2_v", "True")
    assert meta["modelspec.prediction_type"] == "v"
    assert any(s.startswith("lora_te_text_model_encoder_layers_") for s in stems)
    assert any(s.startswith("lora_unet_down_blocks_") for s in stems)  # SD 2.x keeps diffusers names
    assert (tmp_path / "samples" / "step-000003-00.png").is_file()


# ------------------------------------------------------------------------------------- zero terminal SNR
@pytest.mark.parametrize("sampler", ["euler", "euler_a", "ddim", "dpmpp_2m"])
def test_zero_terminal_snr_reaches_the_samplers(sampler: str) -> None:
    bundle = load_models(ModelConfig(path=V, zero_terminal_snr=True))
    assert bundle.zero_terminal_snr
    models = SampleModels(bundle.unet, bundle.vae, bundle.text_encoders, bundle.tokenizers, bundle.scheduler_config)
    scheduler = make_pipeline(models, sampler).scheduler
    assert scheduler.config.rescale_betas_zero_snr and scheduler.config.timestep_spacing == "trailing"
    assert scheduler.alphas_cumprod[-1] < 1e-6  # Euler-type samplers keep 2**-24 so that sigma stays finite
    scheduler.set_timesteps(4)
    assert int(scheduler.timesteps[0]) == 999  # sampling starts from pure noise


def test_zero_terminal_snr_from_the_files_and_its_contradictions(tmp_path: Path) -> None:
    folder = shutil.copytree(resolve_builtin(V), tmp_path / "ztsnr")
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched_file.write_text(json.dumps(json.loads(sched_file.read_text()) | {"rescale_betas_zero_snr": True}))
    bundle = load_models(ModelConfig(path=str(folder)))
    assert bundle.zero_terminal_snr and bundle.noise_scheduler.alphas_cumprod[-1] == 0
    assert any("zero terminal SNR (the model's files)" in line for line in bundle.describe())

    with pytest.raises(ModelError, match=r"zero terminal SNR \(model\.zero_terminal_snr\) needs a v-prediction.*"
                       r"epsilon \(scheduler/scheduler_config\.json: prediction_type=epsilon\)"):  # fmt: skip
        load_models(ModelConfig(path="builtin:tiny-sd-random", zero_terminal_snr=True))
    with pytest.raises(ConfigError, match=r"sample\.sampler: pndm cannot sample with model\.zero_terminal_snr"):
        tiny_config(tmp_path, model__path=V, model__zero_terminal_snr=True, sample__sampler="pndm")


# ------------------------------------------------------------------------------------------------ detection
def test_a_prediction_type_that_contradicts_the_files_is_an_error_naming_both(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model\.prediction_type is 'epsilon' but the files say v_prediction "
                       r"\(scheduler/scheduler_config\.json: prediction_type=v_prediction\)"):  # fmt: skip
        load_models(ModelConfig(path=V, prediction_type="epsilon"))
    xl = save_single_file(load_models(ModelConfig(path="builtin:tiny-sdxl")), tmp_path / "xl.safetensors")
    with pytest.raises(ModelError, match=r"the files say epsilon \(metadata loha_train\.prediction_type=epsilon\)"):
        load_models(ModelConfig(path=str(xl), prediction_type="v_prediction", tokenizer_path="builtin:tiny-sdxl"))


def _without_prediction_metadata(path: Path) -> Path:
    """Our single file as a third-party SD 2.x file would be: nothing says whether it predicts v or noise."""
    with safe_open(str(path), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != layout.METADATA_PREDICTION}
    save_file(load_file(path), path, metadata=metadata)
    return path


def test_an_sd2_single_file_that_does_not_say_takes_the_configured_prediction_type(tmp_path: Path) -> None:
    path = _without_prediction_metadata(save_single_file(load_models(ModelConfig(path=V)), tmp_path / "v.safetensors"))
    assert detect_model(path).prediction_type is None
    with pytest.raises(ModelError, match=r"v\.safetensors: this SD 2\.x model's files do not say.*model\.prediction"):
        load_models(ModelConfig(path=str(path), tokenizer_path=V))
    for wanted in ("v_prediction", "epsilon"):  # 768-v or 512-base: the user knows, the file does not
        bundle = load_models(ModelConfig(path=str(path), tokenizer_path=V, prediction_type=wanted))
        assert bundle.prediction_type == bundle.noise_scheduler.config.prediction_type == wanted
        assert f"prediction {wanted}: model.prediction_type (the files do not say)" in bundle.describe()

    save_file(load_file(path), path, metadata={"modelspec.prediction_type": "v"})  # Stability's model spec
    info = detect_model(path)
    assert info.prediction_type == "v_prediction" and "metadata modelspec.prediction_type=v" in info.evidence


def test_the_dry_run_plan_says_where_family_and_prediction_type_came_from(tmp_path: Path) -> None:
    from loha_train.training.recipe import train

    lines: list[str] = []
    cfg = tiny_config(tmp_path, model__path=V, model__zero_terminal_snr=True)
    train(cfg, dry_run=True, echo=lines.append)
    plan = "\n".join(lines)
    assert "(sd2, v_prediction, diffusers)" in plan
    assert "family sd2: unet/config.json: use_linear_projection=true" in plan
    assert "prediction v_prediction: scheduler/scheduler_config.json: prediction_type=v_prediction" in plan
    assert "zero terminal SNR (model.zero_terminal_snr): rescaled noise schedule; samplers use trailing" in plan
