"""Sample images are conditioned exactly as training is: what the UNet receives while sampling is the reference
text conditioning (kohya's clip_skip definition) for SD 1.x, SD 2.x and SDXL."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from loha_train.config import ModelConfig, SampleConfig, SamplePrompt
from loha_train.models.loading import load_models
from loha_train.training.sampling import SampleModels, generate

pytestmark = pytest.mark.usefixtures("builtin_cache", "fresh_accelerate")


def reference(bundle: Any, prompt: str, clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """kohya: SD 1/2 take the last hidden state, or the clip_skip-th last through the final layer norm; SDXL the
    penultimate (+ clip_skip - 1) layers of both encoders side by side and the second encoder's pooled projection."""
    hidden, pooled = [], None
    for te, tok in zip(bundle.text_encoders, bundle.tokenizers, strict=True):
        ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        out = te(ids.input_ids, output_hidden_states=True)
        if len(bundle.text_encoders) == 2:
            hidden.append(out.hidden_states[-(clip_skip + 1)])
            pooled = out.text_embeds if hasattr(out, "text_embeds") else None
        elif clip_skip == 1:
            hidden.append(out.last_hidden_state)
        else:
            norm = getattr(te, "text_model", te).final_layer_norm
            hidden.append(norm(out.hidden_states[-clip_skip]))
    return torch.cat(hidden, dim=-1), pooled


@pytest.mark.parametrize("clip_skip", [1, 2])
@pytest.mark.parametrize("model", ["builtin:tiny-sd-random", "builtin:tiny-sd-v", "builtin:tiny-sdxl"])
@torch.no_grad()
def test_the_unet_sees_the_training_conditioning_while_sampling(model: str, clip_skip: int) -> None:
    bundle = load_models(ModelConfig(path=model))
    seen: list[dict[str, Any]] = []
    hook = bundle.unet.register_forward_pre_hook(lambda _m, _a, kw: seen.append(dict(kw)), with_kwargs=True)
    models = SampleModels(
        bundle.unet, bundle.vae, bundle.text_encoders, bundle.tokenizers, bundle.scheduler_config, clip_skip
    )
    prompt = SamplePrompt("a red circle on white", negative_prompt="blurry", width=64, height=64, steps=1)
    generate(models, SampleConfig(prompts=(prompt,), guidance=5.0, sampler="euler"), 64)
    hook.remove()
    got = seen[0]["encoder_hidden_states"]  # classifier-free guidance: [negative, positive]
    for row, text in ((1, prompt.prompt), (0, prompt.negative_prompt)):
        want, pooled = reference(bundle, text, clip_skip)
        torch.testing.assert_close(got[row : row + 1], want, rtol=1e-5, atol=1e-5)
        if pooled is not None:
            text_embeds = seen[0]["added_cond_kwargs"]["text_embeds"]
            torch.testing.assert_close(text_embeds[row : row + 1], pooled, rtol=1e-5, atol=1e-5)
