"""The `-m lowest` subset (also run on the lowest versions pyproject allows, scripts/ci_lowest.sh): loading,
injection, training with the text encoder under gradient checkpointing, export and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_text_encoder
from safetensors.torch import load_file
from test_train import losses, run

from loha_train.fileformat.keys import sd_components
from loha_train.loha.inject import LoHaNetwork, inject_loha
from loha_train.training.grad_check import check_gradients_arrived
from loha_train.training.guards import TrainingError
from loha_train.training.setup import enable_text_encoder_checkpointing

pytestmark = [pytest.mark.lowest, pytest.mark.usefixtures("builtin_cache", "fresh_accelerate")]


def te_network() -> tuple[torch.nn.Module, LoHaNetwork]:
    from loha_train.config import NetworkConfig

    te = make_tiny_text_encoder()
    network = inject_loha(sd_components(None, [te], family="sd1"), NetworkConfig(preset="attn-mlp"), seed=0)
    return te, network


def test_text_encoder_adapters_get_gradients_under_checkpointing() -> None:
    te, network = te_network()
    enable_text_encoder_checkpointing(te)
    te.train()
    ids = torch.randint(0, te.config.vocab_size, (2, te.config.max_position_embeddings))
    te(ids).last_hidden_state.square().mean().backward()  # token ids never require grad
    no_grad = [
        n for key, m in network.modules.items() for n, p in m.named_parameters() if p.requires_grad and p.grad is None
    ]
    assert no_grad == [], f"{len(no_grad)} adapter tensors got no gradient"
    check_gradients_arrived(network, some_may_be_unused=False)


def test_a_component_without_gradients_stops_the_run() -> None:
    _, network = te_network()
    for i, module in enumerate(network.modules.values()):
        for p in module.parameters():
            p.grad = torch.zeros_like(p) if i == 0 else None
    with pytest.raises(TrainingError, match=r"text_encoder: \d+ \(lora_te_"):
        check_gradients_arrived(network, some_may_be_unused=False)
    check_gradients_arrived(network, some_may_be_unused=True)  # one adapter got one: clip_skip/dropout may do this
    for p in network.parameters():
        p.grad = None
    with pytest.raises(TrainingError, match="received no gradient"):
        check_gradients_arrived(network, some_may_be_unused=True)


def test_text_encoder_training_with_checkpointing_exports_and_resumes_exactly(tmp_path: Path) -> None:
    sets = {"network__train_text_encoder": True, "train__gradient_checkpointing": True, "train__max_steps": 4}
    adapter = run(tmp_path / "straight", **sets)
    run(tmp_path / "split", **{**sets, "train__max_steps": 2})
    run(tmp_path / "split", resume="latest", **sets)
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    assert adapter is not None
    a, b = load_file(str(adapter)), load_file(str(tmp_path / "split" / "loha.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # every text-encoder adapter trained: its delta (w1_a @ w1_b) * (w2_a @ w2_b) left zero
    stems = {k.rsplit(".", 1)[0] for k in a if k.startswith("lora_te_")}
    assert stems
    for s in stems:
        delta = (a[f"{s}.hada_w1_a"] @ a[f"{s}.hada_w1_b"]).float() * (
            a[f"{s}.hada_w2_a"] @ a[f"{s}.hada_w2_b"]
        ).float()
        assert delta.abs().sum() > 0, f"{s} did not train"
