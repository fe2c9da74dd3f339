"""Long captions (model.max_token_length 150/225): the conditioning equals kohya sd-scripts' chunked encoding for
SD 1.x, SD 2.x and SDXL (reference written here from library/train_util.py get_input_ids/get_hidden_states and
sdxl_train_util's SDXL variant), samples use it, and the plan counts truncated captions."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from loha_train.config import ModelConfig
from loha_train.models.encode import encode_captions
from loha_train.models.loading import load_models

pytestmark = pytest.mark.usefixtures("builtin_cache", "fresh_accelerate")

WORDS = ["red", "green", "blue", "circle", "square", "triangle", "white", "black", "gray"]


def long_caption(n_words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_words))


def kohya_input_ids(tok: Any, caption: str, max_token_length: int) -> torch.Tensor:
    """train_util.BaseDataset.get_input_ids for one caption: (chunks, 77)."""
    tokenizer_max_length = max_token_length + 2
    ids = tok(caption, padding="max_length", truncation=True, max_length=tokenizer_max_length, return_tensors="pt")
    ids = ids.input_ids.squeeze(0)
    out = []
    for i in range(1, tokenizer_max_length - tok.model_max_length + 2, tok.model_max_length - 2):
        chunk = torch.cat((ids[0].unsqueeze(0), ids[i : i + tok.model_max_length - 2], ids[-1].unsqueeze(0)))
        if tok.pad_token_id != tok.eos_token_id:  # v2 / SDXL
            if chunk[-2] != tok.eos_token_id and chunk[-2] != tok.pad_token_id:
                chunk[-1] = tok.eos_token_id
            if chunk[1] == tok.pad_token_id:
                chunk[1] = tok.eos_token_id
        out.append(chunk)
    return torch.stack(out)


def kohya_join(hidden: torch.Tensor, max_token_length: int, size: int = 77) -> torch.Tensor:
    """get_hidden_states' reassembly (b, n*77, d) -> <BOS>, each chunk's 75 tokens, the last <EOS>/<PAD>."""
    states = [hidden[:, 0].unsqueeze(1)]
    for i in range(1, max_token_length, size):
        states.append(hidden[:, i : i + size - 2])
    states.append(hidden[:, -1].unsqueeze(1))
    return torch.cat(states, dim=1)


def kohya_reference(bundle: Any, caption: str, max_token_length: int, clip_skip: int) -> dict[str, torch.Tensor]:
    sdxl = len(bundle.text_encoders) == 2
    hidden, pooled = [], None
    for k, (te, tok) in enumerate(zip(bundle.text_encoders, bundle.tokenizers, strict=True)):
        ids = kohya_input_ids(tok, caption, max_token_length)  # (n, 77): one caption, n chunks
        out = te(ids, output_hidden_states=True)
        if sdxl:
            states = out.hidden_states[-(clip_skip + 1)]
            if k == 1:
                pooled = out.text_embeds[:: len(ids)]  # "pool はnの最初のものを使う": the first chunk's
        elif clip_skip == 1:
            states = out.last_hidden_state
        else:
            states = getattr(te, "text_model", te).final_layer_norm(out.hidden_states[-clip_skip])
        hidden.append(kohya_join(states.reshape(1, -1, states.shape[-1]), max_token_length))
    ref = {"encoder_hidden_states": torch.cat(hidden, dim=-1)}
    return ref | ({"text_embeds": pooled} if pooled is not None else {})


@pytest.mark.parametrize("max_token_length", [150, 225])
@pytest.mark.parametrize("model", ["builtin:tiny-sd-random", "builtin:tiny-sd-v", "builtin:tiny-sdxl"])
@torch.no_grad()
def test_long_captions_are_encoded_as_kohya_does(model: str, max_token_length: int) -> None:
    bundle = load_models(ModelConfig(path=model))
    captions = [long_caption(20), long_caption(120), long_caption(400)]  # one chunk, two or three, truncated
    got = encode_captions(bundle.text_encoders, bundle.tokenizers, captions, 2, max_token_length)
    assert got["encoder_hidden_states"].shape[1] == max_token_length + 2
    for row, caption in enumerate(captions):
        want = kohya_reference(bundle, caption, max_token_length, clip_skip=2)
        for name, tensor in want.items():
            torch.testing.assert_close(got[name][row : row + 1], tensor, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_sdxl_second_tokenizer_pads_with_another_token_than_eos() -> None:
    """SD 2.x/SDXL's OpenCLIP tokenizer pads with "!" (not <EOS>): the branch that fixes chunk ends runs."""
    bundle = load_models(ModelConfig(path="builtin:tiny-sdxl"))
    tok = bundle.tokenizers[1]
    assert tok.pad_token_id != tok.eos_token_id
    from loha_train.models.encode import tokenize_chunks

    for caption in (long_caption(20), long_caption(76), long_caption(120)):
        torch.testing.assert_close(tokenize_chunks(tok, [caption], 225)[0], kohya_input_ids(tok, caption, 225))


def test_the_plan_counts_truncated_captions_and_a_dry_run_lists_the_longest(tmp_path) -> None:
    from test_train import tiny_config

    from loha_train.training.data_pipeline import caption_notes

    bundle = load_models(ModelConfig(path="builtin:tiny-sd-random"))
    cfg = tiny_config(tmp_path)
    captions = [long_caption(10), long_caption(100), long_caption(200)]
    notes = caption_notes(cfg, bundle, captions, list_longest=False)
    assert len(notes) == 1 and notes[0].startswith("2 of 3 captions are longer than 75 tokens")
    cfg225 = tiny_config(tmp_path, model__max_token_length=225)
    assert caption_notes(cfg225, bundle, captions, list_longest=False) == ()
    listed = caption_notes(cfg225, bundle, captions, list_longest=True)
    assert [line.split(":")[0] for line in listed] == ["longest caption"] * 3 and "200 tokens" in listed[0]
