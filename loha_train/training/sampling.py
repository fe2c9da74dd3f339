"""Sample images during training: a diffusers pipeline over the live (adapted) models, PNG files and a grid."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from loha_train.config import Config, SampleConfig, SamplePrompt
from loha_train.models.bundle import ModelBundle
from loha_train.models.encode import encode_captions
from loha_train.training import concept
from loha_train.training.metrics import MetricsLog, save_png
from loha_train.training.progress import counter

_SAMPLERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
}


@dataclass(frozen=True)
class SampleModels:
    """What a pipeline needs; the UNet and text encoders are the adapted, unwrapped modules."""

    unet: nn.Module
    vae: nn.Module
    text_encoders: Sequence[nn.Module]
    tokenizers: Sequence[Any]
    scheduler_config: Any
    clip_skip: int = 1  # model.clip_skip: prompts are encoded exactly as training encodes captions
    max_token_length: int = 75  # model.max_token_length, likewise


@contextlib.contextmanager
def _without_torchvision_notes() -> Iterator[None]:
    """Building a diffusers pipeline imports the CLIP/SigLIP image processors of safety checkers and IP-adapters,
    which we never use; without torchvision transformers warns about each. Keep those two lines off the console."""
    notes = logging.getLogger("transformers.utils.import_utils")
    level = notes.level
    notes.setLevel(logging.ERROR)
    try:
        yield
    finally:
        notes.setLevel(level)


def make_pipeline(models: SampleModels, sampler: str) -> Any:
    with _without_torchvision_notes():
        return _make_pipeline(models, sampler)


def _make_pipeline(models: SampleModels, sampler: str) -> Any:
    import diffusers

    scheduler = getattr(diffusers, _SAMPLERS[sampler]).from_config(models.scheduler_config)
    if len(models.text_encoders) == 2:
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=models.vae,
            text_encoder=models.text_encoders[0],
            text_encoder_2=models.text_encoders[1],
            tokenizer=models.tokenizers[0],
            tokenizer_2=models.tokenizers[1],
            unet=models.unet,
            scheduler=scheduler,
        )
    else:
        pipe = diffusers.StableDiffusionPipeline(
            vae=models.vae,
            text_encoder=models.text_encoders[0],
            tokenizer=models.tokenizers[0],
            unet=models.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def _eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


def generate(
    models: SampleModels,
    cfg: SampleConfig,
    resolution: int,
    autocast: contextlib.AbstractContextManager | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Image.Image]:
    """One image per prompt, each from its own seeded generator, so the same step gives the same images.
    `progress(done, total)` is called after each image."""
    pipe = make_pipeline(models, cfg.sampler)
    images = []
    with _eval_mode([models.unet, *models.text_encoders]), torch.no_grad(), autocast or contextlib.nullcontext():
        for i, prompt in enumerate(cfg.prompts):
            images.append(_one(pipe, models, prompt, cfg, resolution, default_seed=cfg.seed + i))
            if progress is not None:
                progress(i + 1, len(cfg.prompts))
    return images


def prompt_embeddings(models: SampleModels, prompt: str, negative_prompt: str) -> dict[str, torch.Tensor]:
    """The pipeline's prompt_embeds (and SDXL's pooled ones) for a prompt and its negative, from encode_captions:
    the conditioning training uses (clip_skip included), not the pipeline's own encoding, which counts clip_skip
    differently and would drift from training with any change to how captions are encoded."""
    texts = [prompt, negative_prompt]
    cond = encode_captions(models.text_encoders, models.tokenizers, texts, models.clip_skip, models.max_token_length)
    hidden = cond["encoder_hidden_states"]
    out = {"prompt_embeds": hidden[:1], "negative_prompt_embeds": hidden[1:]}
    if "text_embeds" in cond:
        out |= {
            "pooled_prompt_embeds": cond["text_embeds"][:1],
            "negative_pooled_prompt_embeds": cond["text_embeds"][1:],
        }
    return out


def _one(
    pipe: Any, models: SampleModels, p: SamplePrompt, cfg: SampleConfig, resolution: int, default_seed: int
) -> Image.Image:
    generator = torch.Generator(device="cpu").manual_seed(p.seed if p.seed is not None else default_seed)
    result = pipe(
        **prompt_embeddings(models, p.prompt, p.negative_prompt),
        width=p.width or resolution,
        height=p.height or resolution,
        num_inference_steps=p.steps or cfg.steps,
        guidance_scale=p.guidance if p.guidance is not None else cfg.guidance,
        guidance_rescale=cfg.guidance_rescale or 0.0,
        generator=generator,
        output_type="pil",
    )
    return result.images[0]


def grid(images: Sequence[Image.Image], columns: int = 4) -> Image.Image:
    """Images side by side (rows of `columns`), each cell the size of the largest image."""
    cols = max(1, min(columns, len(images)))
    rows = (len(images) + cols - 1) // cols
    w, h = max(i.width for i in images), max(i.height for i in images)
    canvas = Image.new("RGB", (cols * w, rows * h), "white")
    for n, image in enumerate(images):
        canvas.paste(image, ((n % cols) * w, (n // cols) * h))
    return canvas


def save_samples(images: Sequence[Image.Image], folder: Path, step: int) -> Path:
    """samples/step-NNNNNN-PP.png per prompt and samples/step-NNNNNN-grid.png; returns the grid path."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_png(image, folder / f"step-{step:06d}-{i:02d}.png")
    grid_path = folder / f"step-{step:06d}-grid.png"
    save_png(grid(images), grid_path)
    return grid_path


def guidance_rescale(cfg: Config) -> float:
    """sample.guidance_rescale, or its default: 0.7 for a zero-terminal-SNR model (the value Lin et al. 2024 and
    diffusers recommend against over-exposure at high guidance), else 0 (plain classifier-free guidance)."""
    if cfg.sample.guidance_rescale is not None:
        return cfg.sample.guidance_rescale
    return 0.7 if cfg.model.zero_terminal_snr else 0.0


def generate_live(cfg: Config, bundle: ModelBundle, accelerator: Any, what: str) -> list[Image.Image]:
    """The configured prompts through the live (adapted) models; the global RNG state is kept. Main process only."""
    models = SampleModels(
        accelerator.unwrap_model(bundle.unet),
        bundle.vae,
        [accelerator.unwrap_model(te) for te in bundle.text_encoders],
        bundle.tokenizers,
        bundle.scheduler_config,
        cfg.model.clip_skip,
        cfg.model.max_token_length,
    )
    rng_state = torch.random.get_rng_state()
    with counter(f"sampling {what}", unit="image", position=1) as progress:
        sample_cfg = replace(cfg.sample, guidance_rescale=guidance_rescale(cfg))
        images = generate(models, sample_cfg, cfg.data.resolution, accelerator.autocast(), progress)
    torch.random.set_rng_state(rng_state)
    return images


def sample_now(cfg: Config, bundle: ModelBundle, accelerator: Any, log: MetricsLog, folder: Path, step: int) -> None:
    """Generate the configured prompts on the main process (the RNG state is kept); the others wait.
    With sample.concept, the concept measure of the images is logged at the same step."""
    if accelerator.is_main_process:
        images = generate_live(cfg, bundle, accelerator, f"at step {step}")
        grid_path = save_samples(images, folder, step)
        with Image.open(grid_path) as grid_image:
            log.image("samples", grid_image.copy(), step)
        if (result := concept.score(cfg, images)) is not None:
            log.scalars(step, concept.scalars(result))
    accelerator.wait_for_everyone()
