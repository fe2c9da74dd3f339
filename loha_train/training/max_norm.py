"""Max-norm regularisation (kohya's `scale_weight_norms`): after each optimizer step, every module whose full
delta weight has a Frobenius norm above the limit is scaled back onto it."""

from __future__ import annotations

import torch

from loha_train.loha.inject import LoHaNetwork


@torch.no_grad()
def apply_max_norm(network: LoHaNetwork, max_norm: float) -> tuple[int, float, float]:
    """Scale down the adapters whose delta weight norm (alpha / rank applied) exceeds `max_norm`; returns
    (keys scaled, mean norm, max norm) over all modules after scaling, as kohya's `apply_max_norm_regularization`.

    As kohya does: norm = max(||DeltaW||, max_norm / 2), ratio = min(norm, max_norm) / norm. The delta of a LoHa
    is (w1a w1b) * (w2a w2b) (Hadamard), linear in w1a and in w2a (also with CP factors), so multiplying both by
    sqrt(ratio) scales it by ratio, as kohya splits the ratio between a LoRA's up and down.
    """
    scaled, norms = 0, []
    for module in network.modules.values():
        norm = module.delta_weight().norm()
        clamped = norm.clamp(min=max_norm / 2)
        ratio = clamped.clamp(max=max_norm) / clamped
        if float(ratio) != 1.0:
            scaled += 1
            root = ratio.sqrt()
            module.hada_w1_a.mul_(root.to(module.hada_w1_a.dtype))
            module.hada_w2_a.mul_(root.to(module.hada_w2_a.dtype))
        norms.append(float(norm * ratio))
    if not norms:
        return 0, 0.0, 0.0
    return scaled, sum(norms) / len(norms), max(norms)
