"""How AUTOMATIC1111 WebUI and ComfyUI apply a LoHa module's `dora_scale` (DoRA), re-implemented to judge our files.

A DoRA module trains W' = (W + DeltaW) * m / ||W + DeltaW|| (LyCORIS's `weight_decompose`), the norm per output row
(`wd_on_output`, LyCORIS's default; dora_scale (out, 1, ...)) or per input column (dora_scale (1, in, ...)). Both
consumers read `dora_scale` for LoHa, each with its own rule:
- WebUI (`extensions-builtin/Lora/network.py`, `NetworkModule.apply_weight_decompose`, reached from
  `finalize_updown` for every module type, LoHa included): always the per-input-column norm of W + scale * DeltaW,
  then W + multiplier * (W' - W). A per-output-row dora_scale (out, 1) divided by that (1, in) norm broadcasts to an
  (out, in) factor: the file loads without an error and its weights come out wrong.
- ComfyUI (`comfy/weight_adapter/base.py`, `weight_decompose`, called by `LoHaAdapter.calculate_weight` when the
  file has a dora_scale): the axis from dora_scale's shape (`dora_scale.shape[0] == weight.shape[0]`); per input
  column it normalises W + DeltaW like LyCORIS; per output row it divides by the norm of the base weight W, not of
  W + DeltaW, so the result is close to the trained weight only while DeltaW is small; then
  W + strength * (W' - W).
At multiplier/strength 1 the exact cases equal the trained layer (up to LyCORIS's 1e-7 epsilon on the norm).
"""

from __future__ import annotations

EXACT, APPROXIMATE, WRONG = "exact", "approximate", "wrong"


def dora_verdict(consumer: str, axis: str) -> tuple[str, str]:
    """(exact | approximate | wrong, why) for a module whose dora_scale is per `axis` ("out" or "in")."""
    if consumer == "WebUI":
        if axis == "in":
            return EXACT, "per-input-column norm of W + DeltaW, as trained"
        return WRONG, "WebUI normalises per input column; a per-output-row dora_scale broadcasts to a wrong scale"
    if axis == "in":
        return EXACT, "per-input-column norm of W + DeltaW, as trained"
    return APPROXIMATE, "ComfyUI divides by the base weight's row norm ||W||, not ||W + DeltaW||"
