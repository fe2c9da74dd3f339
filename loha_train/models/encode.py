"""What the frozen encoders make of inputs: captions -> conditioning (SD 1.x/2.x one CLIP, SDXL two plus pooled),
pixels -> latents."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from loha_train.models.bundle import ModelBundle


def tokenize(tokenizer: object, captions: Sequence[str]) -> Tensor:
    """Token ids (batch, model_max_length): padded and truncated as SD was trained."""
    return tokenizer(  # type: ignore[operator]
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,  # type: ignore[attr-defined]
        truncation=True,
        return_tensors="pt",
    ).input_ids


def tokenize_chunks(tokenizer: object, captions: Sequence[str], max_token_length: int = 75) -> Tensor:
    """Token ids (batch, chunks, model_max_length) as kohya sd-scripts makes them for `max_token_length`.

    75: one chunk, as SD was trained. 150/225: the caption is tokenized to max_token_length + 2 and cut into 75-token
    chunks, each wrapped as <BOS> chunk <last token>; for tokenizers whose pad is not EOS (SD 2.x, SDXL's second) a
    chunk ending in a word ends in <EOS>, and an empty chunk starts <BOS> <EOS>.
    """
    size = tokenizer.model_max_length  # type: ignore[attr-defined]
    if max_token_length <= size - 2:
        return tokenize(tokenizer, captions)[:, None]
    ids = tokenizer(  # type: ignore[operator]
        list(captions), padding="max_length", max_length=max_token_length + 2, truncation=True, return_tensors="pt"
    ).input_ids
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id  # type: ignore[attr-defined]
    chunks = []
    for start in range(1, max_token_length + 2 - size + 2, size - 2):
        chunk = torch.cat([ids[:, :1], ids[:, start : start + size - 2], ids[:, -1:]], dim=1)
        if pad != eos:
            chunk[(chunk[:, -2] != eos) & (chunk[:, -2] != pad), -1] = eos
            chunk[chunk[:, 1] == pad, 1] = eos
        chunks.append(chunk)
    return torch.stack(chunks, dim=1)


def join_chunks(hidden: Tensor, chunks: int) -> Tensor:
    """(batch * chunks, 77, dim) -> (batch, 75 * chunks + 2, dim): the first <BOS>, each chunk's 75 tokens, and the
    last chunk's final token, as kohya concatenates them."""
    if chunks == 1:
        return hidden
    size = hidden.shape[1]
    flat = hidden.reshape(hidden.shape[0] // chunks, chunks * size, hidden.shape[-1])
    parts = [flat[:, :1], *(flat[:, i : i + size - 2] for i in range(1, chunks * (size - 2), size)), flat[:, -1:]]
    return torch.cat(parts, dim=1)


def token_counts(tokenizer: object, captions: Sequence[str]) -> list[int]:
    """Each caption's token count without <BOS>/<EOS> (what max_token_length is compared with)."""
    return [len(ids) - 2 for ids in tokenizer(list(captions)).input_ids]  # type: ignore[operator]


def _final_norm(text_encoder: nn.Module) -> nn.Module:
    # transformers 5 has final_layer_norm on CLIPTextModel itself; transformers 4 under .text_model
    text_encoder = getattr(text_encoder, "module", text_encoder)  # a DistributedDataParallel wrapper's module
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def encode_sd(text_encoder: nn.Module, ids: Tensor, clip_skip: int = 1) -> Tensor:
    """SD 1.x/2.x: last hidden state, or with clip_skip N the N-th last layer through the final layer norm."""
    out = text_encoder(ids, output_hidden_states=clip_skip > 1)
    if clip_skip == 1:
        return out.last_hidden_state
    return _final_norm(text_encoder)(out.hidden_states[-clip_skip])


def encode_sdxl(text_encoders: Sequence[nn.Module], ids: Sequence[Tensor], clip_skip: int = 1) -> dict[str, Tensor]:
    """SDXL: the penultimate layers of both encoders side by side, and the second encoder's pooled projection.

    clip_skip counts from SDXL's usual penultimate layer (1 = penultimate, as kohya does).
    """
    hidden = []
    pooled = None
    for te, tok in zip(text_encoders, ids, strict=True):
        out = te(tok, output_hidden_states=True)
        hidden.append(out.hidden_states[-(clip_skip + 1)])
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    assert pooled is not None
    return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}


def encode_captions(
    text_encoders: Sequence[nn.Module],
    tokenizers: Sequence[object],
    captions: Sequence[str],
    clip_skip: int = 1,
    max_token_length: int = 75,
) -> dict[str, Tensor]:
    """Captions -> the UNet's text conditioning: {"encoder_hidden_states"[, "text_embeds"]}.

    Long captions (max_token_length 150/225) are encoded chunk by chunk and joined as kohya does; SDXL's pooled
    embedding is the first chunk's.
    """
    device = next(text_encoders[0].parameters()).device
    ids = [tokenize_chunks(tok, captions, max_token_length).to(device) for tok in tokenizers]
    chunks = ids[0].shape[1]
    flat = [i.flatten(0, 1) for i in ids]
    if len(text_encoders) == 1:
        return {"encoder_hidden_states": join_chunks(encode_sd(text_encoders[0], flat[0], clip_skip), chunks)}
    out = encode_sdxl(text_encoders, flat, clip_skip)
    return {
        "encoder_hidden_states": join_chunks(out["encoder_hidden_states"], chunks),
        "text_embeds": out["text_embeds"][::chunks],
    }


def sdxl_time_ids(original_size: Tensor, crop_top_left: Tensor, target_size: Tensor) -> Tensor:
    """SDXL size/crop conditioning per sample: (batch, 6) = original (h, w), crop (top, left), target (h, w)."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).to(torch.float32)


def vae_encode(bundle: ModelBundle, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled latents (the distribution's mode, so caching is deterministic).

    Always in the VAE's own dtype (model.vae_dtype), outside any autocast: cached and uncached latents agree, and
    the precision the cache key records is the one used.
    """
    vae = bundle.vae
    device = next(vae.parameters()).device
    with torch.autocast(device.type, enabled=False):
        latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()
