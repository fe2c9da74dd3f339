"""Build the demo model behind builtin:tiny-sd: a small SD-architecture latent-diffusion model that draws shapes.

    .venv/bin/python scripts/build_demo_model.py                      # the committed model (see README: time)
    .venv/bin/python scripts/build_demo_model.py --out /tmp/demo --scale 0.1   # a quick trial at 1/10 the steps

Deterministic on CPU (one seed, fixed thread count, generated data): the same torch version on the same kind of
machine rebuilds the same bits. Three stages, each cheap because the images are 32 px:
1. a VAE (AutoencoderKL, downsampling 4: 32 px -> 8x8x4 latents) trained on random shapes in random colours
   (stars and purple included: the VAE is a general image codec, as SD's is);
2. latents of the UNet's training images encoded once (the distribution's mode, as the trainer caches them), and
   the captions encoded once by a frozen, randomly initialised small CLIP text encoder;
3. a UNet with cross-attention trained on them (epsilon prediction, SD's noise schedule, 10 % empty captions for
   classifier-free guidance, an EMA of the weights is what is saved).
Known weakness of the committed build: 400 VAE steps are too few for colour. Its latents keep a yellow-blue axis
and brightness only (red decodes brown, green gray, purple blue), so the UNet draws blue and yellow well and the
other colours not at all; shapes come out as rough blobs. More VAE steps (and UNet steps) should fix both, at a
proportionally longer build; that was not tried.
The UNet never sees purple or a star: that is what the quickstart teaches it. The output is a diffusers folder in
fp16 (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) plus BUILD.json (the settings, the
sha256 of every file, and a check: the measure on images generated for training captions).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loha_train.models import demo  # noqa: E402
from loha_train.models.builtin import DEMO_CLIP_TEXT, DEMO_DIR, DEMO_UNET, DEMO_VAE, clip_corpus  # noqa: E402
from loha_train.models.clip_bpe import BOS, EOS, train_clip_bpe, write_clip_tokenizer  # noqa: E402
from loha_train.models.reference_configs import SD_SCHEDULE  # noqa: E402


@dataclasses.dataclass
class Settings:
    seed: int = 1234
    threads: int = (
        1  # one thread: as fast as two on an idle 2-core machine for these tiny tensors, far faster on busy ones
    )
    side: int = 32
    vae_steps: int = 400
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-5
    unet_images: int = 4000
    unet_steps: int = 1000
    unet_batch: int = 32
    unet_lr: float = 2e-3
    unet_warmup: int = 100
    ema_decay: float = 0.995
    partial_every: int = 250  # also save the EMA model so far to <out>-partial every N UNet steps
    empty_caption_rate: float = 0.1
    check_steps: int = 20
    check_guidance: float = 5.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def to_tensor(images: list[Any]) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def random_vae_image(rng: random.Random, side: int) -> Any:
    """Any shape (star too) in any colour on a named or random background: the VAE must be a general codec."""
    pick = rng.random()
    colour = rng.choice(list(demo.RGB)) if pick < 0.5 else tuple(rng.randrange(256) for _ in range(3))
    background = rng.choice(demo.BACKGROUNDS) if rng.random() < 0.7 else tuple(rng.randrange(256) for _ in range(3))
    shape = rng.choice((*demo.TRAIN_SHAPES, "star"))
    return demo.shape_image(colour, shape, background, side, rng)


def train_vae(s: Settings) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(s.seed)
    vae = AutoencoderKL(**DEMO_VAE)
    rng = random.Random(s.seed)
    opt = torch.optim.Adam(vae.parameters(), lr=s.vae_lr)
    start = time.time()
    for step in range(s.vae_steps):
        lr = s.vae_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / s.vae_steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        x = to_tensor([random_vae_image(rng, s.side) for _ in range(s.vae_batch)])
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        kl = dist.kl().mean() / dist.mean[0].numel()
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + s.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == s.vae_steps - 1:
            log(f"vae step {step}/{s.vae_steps} loss {loss.item():.4f} kl {kl.item():.3f} ({time.time() - start:.0f}s)")
    return vae.eval()


def unet_data(s: Settings) -> tuple[list[Any], list[str]]:
    rng = random.Random(s.seed + 1)
    images, captions = [], []
    for _ in range(s.unet_images):
        colour, shape, background = (
            rng.choice(demo.TRAIN_COLOURS),
            rng.choice(demo.TRAIN_SHAPES),
            rng.choice(demo.BACKGROUNDS),
        )
        images.append(demo.shape_image(colour, shape, background, s.side, rng))
        captions.append(demo.caption(colour, shape, background))
    return images, captions


def make_text_encoder(s: Settings, vocab: dict[str, int]) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    ids = {"bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[EOS]}
    torch.manual_seed(s.seed + 2)
    return CLIPTextModel(CLIPTextConfig(**DEMO_CLIP_TEXT, **ids)).eval()


def train_unet(
    s: Settings, latents: torch.Tensor, caption_ids: torch.Tensor, embeds: torch.Tensor, partial: Any
) -> Any:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(s.seed + 3)
    unet = UNet2DConditionModel(**DEMO_UNET)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    accepted = inspect.signature(DDPMScheduler.__init__).parameters
    noise_sched = DDPMScheduler(**{k: v for k, v in SD_SCHEDULE.items() if k in accepted})
    opt = torch.optim.AdamW(unet.parameters(), lr=s.unet_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(s.seed + 4)
    empty = embeds.shape[0] - 1  # the last embedding is the empty caption's
    start = time.time()
    for step in range(s.unet_steps):
        warm = min(1.0, (step + 1) / s.unet_warmup)
        lr = s.unet_lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / s.unet_steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, latents.shape[0], (s.unet_batch,), generator=gen)
        x0 = latents[idx]
        flip = torch.rand(s.unet_batch, generator=gen) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)  # mirrored images are fine shapes too
        cap = caption_ids[idx]
        cap = torch.where(torch.rand(s.unet_batch, generator=gen) < s.empty_caption_rate, empty, cap)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (s.unet_batch,), generator=gen)
        noisy = noise_sched.add_noise(x0, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=embeds[cap]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(s.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay) if v.is_floating_point() else ema[k].copy_(v)
        if step % 100 == 0 or step == s.unet_steps - 1:
            log(f"unet step {step}/{s.unet_steps} loss {loss.item():.4f} lr {lr:.2e} ({time.time() - start:.0f}s)")
        if step and step % s.partial_every == 0:
            snapshot = UNet2DConditionModel(**DEMO_UNET)
            snapshot.load_state_dict(ema)
            partial(snapshot, step)
    unet.load_state_dict(ema)
    return unet.eval()


def save(dest: Path, vae: Any, unet: Any, text_encoder: Any, vocab: dict[str, int], merges: list[Any]) -> None:
    import diffusers
    from diffusers import PNDMScheduler
    from safetensors.torch import save_file

    if dest.exists():
        shutil.rmtree(dest)
    unet.half().save_pretrained(dest / "unet")
    vae.half().save_pretrained(dest / "vae")
    text_encoder.half().config.save_pretrained(dest / "text_encoder")
    state = {k: v.contiguous() for k, v in text_encoder.state_dict().items()}
    save_file(state, dest / "text_encoder" / "model.safetensors", {"format": "pt"})
    write_clip_tokenizer(dest / "tokenizer", vocab, merges)
    accepted = inspect.signature(PNDMScheduler.__init__).parameters
    settings = {k: v for k, v in SD_SCHEDULE.items() if k in accepted}
    PNDMScheduler(**settings).save_pretrained(dest / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (dest / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check(dest: Path, s: Settings) -> dict[str, Any]:
    """Generate one image per training caption (white background) and measure them; save a grid."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(dest, local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    results: dict[str, Any] = {}
    cells = []
    correct = 0
    for colour in demo.TRAIN_COLOURS:
        for shape in demo.TRAIN_SHAPES:
            prompt = demo.caption(colour, shape, "white")
            gen = torch.Generator().manual_seed(0)
            images = pipe(
                [prompt] * 4,
                num_inference_steps=s.check_steps,
                guidance_scale=s.check_guidance,
                generator=gen,
                height=s.side,
                width=s.side,
            ).images
            score = demo.concept_measure(images, colour, shape)
            shapes = [demo.classify_shape(demo.largest_blob(demo.colour_mask(im, colour))) for im in images]
            correct += sum(x == shape for x in shapes)
            results[prompt] = {"colour": round(score.colour, 3), "shape": round(score.shape, 3), "classified": shapes}
            cells.extend(images)
    grid = Image.new("RGB", (s.side * 8, s.side * 6), "white")
    for i, im in enumerate(cells):
        grid.paste(im, ((i % 8) * s.side, (i // 8) * s.side))
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(dest.parent / f"{dest.name}-check.png")
    results["shape_accuracy"] = correct / len(cells)
    log(f"check: shape accuracy {results['shape_accuracy']:.2f}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / DEMO_DIR)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the step counts (for quick trials)")
    parser.add_argument("--check-only", action="store_true", help="only the check and BUILD.json on --out")
    args = parser.parse_args()
    s = Settings()
    s.vae_steps, s.unet_steps = max(2, round(s.vae_steps * args.scale)), max(2, round(s.unet_steps * args.scale))
    s.unet_images = max(s.unet_batch, round(s.unet_images * min(1.0, args.scale * 2)))
    torch.set_num_threads(s.threads)
    torch.use_deterministic_algorithms(True)
    total = time.time()
    log(f"settings {dataclasses.asdict(s)}")
    if not args.check_only:
        build(s, args.out)
    finish(s, args.out, total)


def build(s: Settings, out: Path) -> None:
    """Stages 1-3, saved to `out`."""

    vocab, merges = train_clip_bpe(clip_corpus(), DEMO_CLIP_TEXT["vocab_size"])
    vae = train_vae(s)
    images, captions = unet_data(s)
    with torch.no_grad():
        chunks = [vae.encode(to_tensor(images[i : i + 256])).latent_dist.mode() for i in range(0, len(images), 256)]
    raw = torch.cat(chunks)
    scaling = round(1.0 / raw.std().item(), 5)
    vae.register_to_config(scaling_factor=scaling)
    latents = raw * scaling
    log(f"latents {tuple(latents.shape)} mean {latents.mean():.3f} std {latents.std():.3f} scaling {scaling}")

    from transformers import CLIPTokenizer

    tmp_tok = out.parent / f".{out.name}-tokenizer"
    write_clip_tokenizer(tmp_tok, vocab, merges)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_tok, local_files_only=True)
    shutil.rmtree(tmp_tok)
    text_encoder = make_text_encoder(s, vocab)
    unique = sorted(set(captions))
    tokens = tokenizer([*unique, ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        embeds = text_encoder(tokens.input_ids)[0]
    caption_ids = torch.tensor([unique.index(c) for c in captions])

    def partial(snapshot: Any, step: int) -> None:
        dest = out.parent / f"{out.name}-partial"
        try:
            save(dest, copy.deepcopy(vae), snapshot, copy.deepcopy(text_encoder), vocab, merges)
            (dest / "STEP").write_text(f"{step}\n")
            log(f"saved the model at UNet step {step} to {dest}")
        except Exception as err:  # a snapshot is a convenience: never lose the build over it
            log(f"could not save the snapshot at step {step}: {err!r}")

    unet = train_unet(s, latents, caption_ids, embeds, partial)
    save(out, vae, unet, text_encoder, vocab, merges)


def finish(s: Settings, out: Path, total: float) -> None:
    """The check on training captions, and BUILD.json."""
    results = check(out, s)
    files = {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "BUILD.json"
    }
    build = {
        "settings": dataclasses.asdict(s),
        "torch": torch.__version__,
        "seconds": round(time.time() - total),
        "sha256": files,
        "check": results,
    }
    (out / "BUILD.json").write_text(json.dumps(build, indent=2) + "\n", encoding="utf-8")
    log(f"done in {time.time() - total:.0f}s -> {out}")


if __name__ == "__main__":
    main()
