"""After the first backward: every trainable adapter must have received a gradient, or the run stops loudly."""

from __future__ import annotations

from loha_train.loha.inject import LoHaNetwork
from loha_train.training.guards import TrainingError


def modules_without_gradient(network: LoHaNetwork) -> dict[str, list[str]]:
    """Per component, the adapter key stems none of whose trainable tensors got a gradient."""
    out: dict[str, list[str]] = {}
    for key, module in network.modules.items():
        trainable = [p for p in module.parameters() if p.requires_grad]
        if trainable and all(p.grad is None for p in trainable):
            out.setdefault(network.components[key], []).append(key)
    return out


def check_gradients_arrived(network: LoHaNetwork, *, some_may_be_unused: bool) -> None:
    """Raise TrainingError naming the adapters that got no gradient in the first step.

    With `some_may_be_unused` (module dropout, or a text encoder's layers after clip_skip: see
    setup.may_leave_adapters_unused) single adapters may legitimately miss a step, so only a whole component
    without any gradient is an error: that is the silent failure of reentrant gradient checkpointing.
    """
    missing = modules_without_gradient(network)
    if some_may_be_unused:
        totals = {c: sum(1 for k in network.components.values() if k == c) for c in missing}
        missing = {c: keys for c, keys in missing.items() if len(keys) == totals[c]}
    if not missing:
        return
    listed = "; ".join(f"{c}: {len(keys)} ({', '.join(keys[:3])}{', …' if len(keys) > 3 else ''})"
                       for c, keys in missing.items())  # fmt: skip
    raise TrainingError(
        f"After the first step these trained adapters received no gradient, so they would never train: {listed}. "
        "This happens when gradient checkpointing recomputes a frozen module whose inputs do not require grad "
        "(reentrant checkpointing, transformers 4.x). Set train.gradient_checkpointing: false, or report it with "
        "your torch/transformers versions."
    )
