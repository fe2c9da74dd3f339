"""What a LoHa file holds, from its keys alone (modules, rank, alpha, CP, target family), and injecting exactly that."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from loha_train.fileformat.adapter_io import CORES, FACTORS, AdapterError, apply_adapter, dora_axis
from loha_train.loha.inject import Component, ExplicitTarget, InjectError, LoHaNetwork, inject_explicit, module_keys

FAMILIES = ("sd1", "sd2", "sdxl")
_SGM_UNET = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks|label_emb|time_embed|out)_")
_CONTEXT = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # cross-attention context width (attn2.to_k input)
_TE_WIDTH = {768: "sd1", 1024: "sd2"}  # lora_te_ hidden width (CLIP-L vs OpenCLIP-H)


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted module as a file describes it."""

    key: str  # kohya key stem
    rank: int
    alpha: float
    use_cp: bool
    delta_shape: tuple[int, ...]  # plain: (out, in * kh * kw); CP: (out, in, kh, kw)
    shapes: dict[str, tuple[int, ...]]  # tensor suffix -> shape, as stored
    dtype: torch.dtype  # of the factors
    dora: str | None = None  # DoRA: "out" (dora_scale per output row, LyCORIS's default) or "in"; None: plain LoHa

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def params(self) -> int:
        return sum(math.prod(s) for k, s in self.shapes.items() if k != "alpha")

    @property
    def component(self) -> str:
        return self.key.split("_")[1]  # unet, te, te1, te2


@dataclass(frozen=True)
class AdapterSpec:
    """Every module of a file and the base-model family it was made for (None: the file does not say)."""

    modules: dict[str, ModuleSpec]
    family: str | None
    evidence: tuple[str, ...] = field(default=())

    def targets(self) -> list[ExplicitTarget]:
        return [
            ExplicitTarget(m.key, m.rank, m.alpha, m.use_cp, m.dora is not None, m.dora != "in")
            for m in self.modules.values()
        ]


def _module_spec(stem: str, tensors: Mapping[str, Tensor]) -> ModuleSpec:
    w1a, w1b = tensors["hada_w1_a"], tensors["hada_w1_b"]
    rank = int(w1b.shape[0])
    cp = "hada_t1" in tensors
    delta = (w1a.shape[1], w1b.shape[1], *tensors["hada_t1"].shape[2:]) if cp else (w1a.shape[0], w1b.shape[1])
    alpha = float(tensors["alpha"]) if "alpha" in tensors else float(rank)
    shapes = {s: tuple(tensors[s].shape) for s in (*FACTORS, *CORES, "alpha", "dora_scale") if s in tensors}
    return ModuleSpec(stem, rank, alpha, cp, tuple(int(d) for d in delta), shapes, w1a.dtype, dora_axis(tensors))


def network_config_from_file(state: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> AdapterSpec:
    """The modules, ranks, alphas and CP flags a (validated) LoHa state names, and the family it targets.

    Enough to inject and load a third-party file for sampling or merging without its training config.
    """
    groups: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        stem, _, suffix = key.partition(".")
        groups.setdefault(stem, {})[suffix] = tensor
    modules = {stem: _module_spec(stem, group) for stem, group in sorted(groups.items())}
    family, evidence = detect_family(modules, metadata or {})
    return AdapterSpec(modules, family, tuple(evidence))


def detect_family(modules: Mapping[str, ModuleSpec], metadata: Mapping[str, str]) -> tuple[str | None, list[str]]:
    """The base family (sd1/sd2/sdxl) a file targets, from its keys and shapes, else its metadata; with reasons."""
    votes: list[tuple[str, str]] = []
    for key, spec in modules.items():
        if key.startswith(("lora_te1_", "lora_te2_")):
            votes.append(("sdxl", f"key prefix {key.split('_text')[0]}_"))
        elif _SGM_UNET.match(key):
            votes.append(("sdxl", f"original-layout UNet key {key}"))
        elif key.endswith("attn2_to_k") and spec.delta_shape[1] in _CONTEXT:
            votes.append((_CONTEXT[spec.delta_shape[1]], f"{key} reads a {spec.delta_shape[1]}-wide text context"))
        elif key.startswith("lora_te_") and key.endswith("q_proj") and spec.delta_shape[1] in _TE_WIDTH:
            votes.append((_TE_WIDTH[spec.delta_shape[1]], f"{key} is {spec.delta_shape[1]} wide"))
    found = list(dict.fromkeys(family for family, _ in votes))
    if len(found) == 1:
        return found[0], list(dict.fromkeys(reason for _, reason in votes))[:3]
    stated = _family_from_metadata(metadata)
    if stated:
        return stated
    if len(found) > 1:
        return None, [f"conflicting keys ({', '.join(found)})"]
    return None, []


def _family_from_metadata(metadata: Mapping[str, str]) -> tuple[str, list[str]] | None:
    """kohya's ss_base_model_version, then WebUI's own rule (ss_v2), then modelspec.architecture."""
    version = metadata.get("ss_base_model_version", "")
    for prefix, family in (("sdxl_", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1")):
        if version.startswith(prefix):
            return family, [f"metadata ss_base_model_version={version}"]
    if metadata.get("ss_v2") == "True":
        return "sd2", ["metadata ss_v2=True"]
    arch = metadata.get("modelspec.architecture", "")
    for prefix, family in (
        ("stable-diffusion-xl", "sdxl"),
        ("stable-diffusion-v2", "sd2"),
        ("stable-diffusion-v1", "sd1"),
    ):
        if arch.startswith(prefix):
            return family, [f"metadata modelspec.architecture={arch}"]
    return None


def delta_fits(delta_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> bool:
    """Whether a delta of `delta_shape` adds onto a weight: same shape, or (out, in * kh * kw) for a conv."""
    weight_shape = tuple(weight_shape)
    if tuple(delta_shape) == weight_shape:
        return True
    return len(delta_shape) == 2 and delta_shape == (weight_shape[0], math.prod(weight_shape[1:]))


def fit_problems(spec: AdapterSpec, components: list[Component]) -> tuple[list[str], list[str]]:
    """(keys naming no module of `components`, "key: why" for modules whose shape or kind does not fit)."""
    index = module_keys(components)
    unknown = [key for key in spec.modules if key not in index]
    misfit = []
    for key, module in spec.modules.items():
        if key not in index:
            continue
        base = index[key][1]
        weight = tuple(base.weight.shape)
        kxk = isinstance(base, nn.Conv2d) and weight[2:] != (1, 1)
        if not delta_fits(module.delta_shape, weight):
            misfit.append(f"{key}: file delta {module.delta_shape}, model weight {weight}")
        elif module.use_cp and not kxk:
            misfit.append(f"{key}: CP factors (hada_t1/t2) for a module that is not a k x k conv")
    return unknown, misfit


def inject_from_file(
    components: list[Component],
    state: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    source: str | Path | None = None,
    family: str | None = None,
) -> LoHaNetwork:
    """Wrap exactly the modules a validated LoHa state names, with its ranks/alphas/CP, and load its tensors.

    `family` is the base model's; a file whose keys or shapes do not fit `components` raises AdapterError
    naming the file, the family the file was made for, and the mismatched keys.
    """
    spec = network_config_from_file(state, metadata)
    unknown, misfit = fit_problems(spec, components)
    if unknown or misfit:
        raise AdapterError(_fit_message(spec, unknown, misfit, source, family))
    try:
        network = inject_explicit(components, spec.targets())
    except InjectError as e:
        raise AdapterError(f"{source or 'the adapter'}: {e}") from None
    apply_adapter(network, state, source=source)
    return network


def _fit_message(
    spec: AdapterSpec, unknown: list[str], misfit: list[str], source: str | Path | None, family: str | None
) -> str:
    made_for = f"made for {spec.family} ({'; '.join(spec.evidence)})" if spec.family else "for an unknown family"
    base = f"the base model ({family})" if family else "the base model"
    parts = [f"{source or 'the adapter'}: this LoHa file is {made_for} and does not fit {base}:"]
    if unknown:
        shown = ", ".join(unknown[:8]) + (f", ... ({len(unknown) - 8} more)" if len(unknown) > 8 else "")
        parts.append(f"{len(unknown)} of {len(spec.modules)} keys name no module of the model ({shown});")
    if misfit:
        shown = "; ".join(misfit[:5]) + (f"; ... ({len(misfit) - 5} more)" if len(misfit) > 5 else "")
        parts.append(f"{len(misfit)} modules have the wrong shape ({shown});")
    parts.append("expected an adapter trained on this base model's architecture.")
    return " ".join(parts)
