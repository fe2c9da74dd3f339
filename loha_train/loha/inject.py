"""Choose target modules by preset and patterns, wrap them in LoHa, and keep them as one network under their keys."""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor, nn

from loha_train.config import NetworkConfig
from loha_train.loha.layers import LoHaModule, parameter_count, wrap_layer

UNET = "unet"
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"


class InjectError(ValueError):
    """A target, pattern or adapter state that does not fit the model."""


@dataclass(frozen=True)
class _Preset:
    unet_containers: frozenset[str]  # class names whose Linear/Conv2d children are targets
    unet_names: frozenset[str]  # module paths targeted directly
    te_containers: frozenset[str]
    convs: bool  # k x k convs included (1x1 convs follow the container rule)


_TRANSFORMER = frozenset({"Transformer2DModel", "BasicTransformerBlock"})
_RESNET = frozenset({"ResnetBlock2D", "Downsample2D", "Upsample2D"})
_TE_ATTN = frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2"})
_TE_ALL = _TE_ATTN | {"CLIPMLP"}
_TOP_LEVEL = frozenset({"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"})

# The LyCORIS presets of the same names; attn-mlp also takes proj_in/proj_out (1x1 convs in SD 1.x), as
# kohya's default LoRA network does.
PRESETS: dict[str, _Preset] = {
    "attn-only": _Preset(frozenset({"Attention"}), frozenset(), _TE_ATTN, convs=False),
    "attn-mlp": _Preset(_TRANSFORMER, frozenset(), _TE_ALL, convs=False),
    "full-lin": _Preset(_TRANSFORMER | _RESNET, _TOP_LEVEL - {"conv_in", "conv_out"}, _TE_ALL, convs=False),
    "full": _Preset(_TRANSFORMER | _RESNET, _TOP_LEVEL, _TE_ALL, convs=True),
    "none": _Preset(frozenset(), frozenset(), frozenset(), convs=False),
}

# Modules that neither A1111 nor ComfyUI map (SDXL's add_embedding, the SDXL text projection): never targets.
_UNMAPPED = re.compile(r"(^|\.)(add_embedding|text_projection)(\.|$)")


KeyFn = Callable[[str, str], str]  # (module path, prefix) -> key stem


@dataclass(frozen=True)
class Component:
    """A model part that can carry adapters: its name in patterns, its module, and how its keys are named."""

    name: str  # "unet", "text_encoder", "text_encoder_2"
    module: nn.Module
    prefix: str  # "lora_unet", "lora_te", "lora_te1", "lora_te2"
    key_fn: KeyFn  # the name we write
    alias_fn: KeyFn | None = None  # another name the consumers also map, accepted when reading a file

    @property
    def is_unet(self) -> bool:
        return self.name == UNET


@dataclass
class LoHaNetwork:
    """The injected adapters: kohya key stem -> LoHa module, plus which component each belongs to."""

    modules: dict[str, LoHaModule] = field(default_factory=dict)
    qualnames: dict[str, str] = field(default_factory=dict)  # key stem -> "unet.down_blocks.0..."
    components: dict[str, str] = field(default_factory=dict)  # key stem -> component name

    def parameters(self, component: str | None = None) -> Iterator[nn.Parameter]:
        for key, module in self.modules.items():
            if component is None or self.components[key] == component:
                yield from module.parameters(recurse=False)

    def state_dict(self) -> dict[str, Tensor]:
        """`<key stem>.<suffix>` -> tensor, the layout of a LyCORIS file (before dtype conversion)."""
        return {
            f"{key}.{suffix}": tensor
            for key, module in self.modules.items()
            for suffix, tensor in module.adapter_state().items()
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy LyCORIS-layout tensors in; any missing, unexpected or misshapen key is an InjectError."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        misshapen = [
            f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or misshapen:
            raise InjectError(_mismatch_message(missing, unexpected, misshapen))
        for key, tensor in own.items():
            tensor.copy_(state[key])  # adapter_state() returns the live parameters and alpha buffers

    def set_multiplier(self, multiplier: float) -> None:
        for module in self.modules.values():
            module.multiplier = multiplier

    def merge(self) -> None:
        for module in self.modules.values():
            module.merge()

    def unmerge(self) -> None:
        for module in self.modules.values():
            module.unmerge()

    def report(self) -> dict[str, dict[str, int]]:
        """Per component: adapted module count and trainable parameter count."""
        out: dict[str, dict[str, int]] = {}
        for key, module in self.modules.items():
            row = out.setdefault(self.components[key], {"modules": 0, "params": 0})
            row["modules"] += 1
            row["params"] += parameter_count(module)
        return out


def _mismatch_message(missing: list[str], unexpected: list[str], misshapen: list[str]) -> str:
    parts = ["The adapter tensors do not fit the injected model."]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
            parts.append(f"{len(items)} {title}: {shown}.")
    return " ".join(parts)


@dataclass(frozen=True)
class _Candidate:
    component: Component
    path: str
    module: nn.Module

    @property
    def qualname(self) -> str:
        return f"{self.component.name}.{self.path}"

    @cached_property
    def key(self) -> str:
        return self.component.key_fn(self.path, self.component.prefix)

    @property
    def names(self) -> list[str]:
        """The key it is written under, then any other name a file may use for it."""
        alias = self.component.alias_fn
        return [self.key] + ([alias(self.path, self.component.prefix)] if alias else [])

    @property
    def is_kxk_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d) and tuple(self.module.kernel_size) != (1, 1)


def _candidates(component: Component) -> Iterator[_Candidate]:
    """Every Linear / Conv2d of a component that a LoHa can wrap, with the classes of its ancestors."""
    modules = dict(component.module.named_modules())
    if any(isinstance(m, LoHaModule) for m in modules.values()):
        raise InjectError(f"The {component.name} already carries LoHa adapters; remove them before injecting again")
    for path, module in modules.items():
        if isinstance(module, nn.Linear | nn.Conv2d) and not _UNMAPPED.search(path):
            yield _Candidate(component, path, module)


def _ancestor_classes(root: nn.Module, path: str) -> set[str]:
    classes, module = set(), root
    for part in path.split(".")[:-1]:
        module = getattr(module, part)
        classes.add(type(module).__name__)
    return classes


def _in_preset(cand: _Candidate, preset: _Preset) -> bool:
    if cand.is_kxk_conv and not preset.convs:
        return False
    if cand.component.is_unet:
        if cand.path in preset.unet_names:
            return True
        containers = preset.unet_containers
    else:
        containers = preset.te_containers
    return bool(containers & _ancestor_classes(cand.component.module, cand.path))


def _matches(pattern: str, cand: _Candidate) -> bool:
    return re.search(pattern, cand.qualname) is not None or re.search(pattern, cand.key) is not None


def _first_match(patterns: dict[str, float], cand: _Candidate) -> float | None:
    for pattern, value in patterns.items():
        if _matches(pattern, cand):
            return value
    return None


def select_targets(components: list[Component], cfg: NetworkConfig) -> list[_Candidate]:
    """The modules the preset and `targets` choose, minus `exclude`; unmatched patterns are an InjectError."""
    if cfg.preset not in PRESETS:
        raise InjectError(f"network.preset: unknown preset {cfg.preset!r}; valid: {', '.join(PRESETS)}")
    preset = PRESETS[cfg.preset]
    every = [c for comp in components for c in _candidates(comp)]
    problems = [
        f"network.targets: {p!r} matches no Linear or Conv2d module"
        for p in cfg.targets
        if not any(_matches(p, c) for c in every)
    ]
    chosen = [c for c in every if _in_preset(c, preset) or any(_matches(p, c) for p in cfg.targets)]
    problems += [
        f"network.exclude: {p!r} matches no targeted module"
        for p in cfg.exclude
        if not any(_matches(p, c) for c in chosen)
    ]
    chosen = [c for c in chosen if not any(_matches(p, c) for p in cfg.exclude)]
    for key, patterns in (("rank_pattern", cfg.rank_pattern), ("alpha_pattern", cfg.alpha_pattern)):
        problems += [
            f"network.{key}: {p!r} matches no targeted module"
            for p in patterns
            if not any(_matches(p, c) for c in chosen)
        ]
    if not chosen and not problems:
        names = ", ".join(c.name for c in components)
        problems.append(f"network.preset {cfg.preset!r} and targets select no module in {names}")
    if problems:
        raise InjectError("Cannot place the LoHa adapters: " + "; ".join(problems) + ".")
    return chosen


def rank_alpha_for(cand: _Candidate, cfg: NetworkConfig) -> tuple[int, float]:
    """Rank and alpha of one module: pattern overrides, else conv_rank/conv_alpha for k x k convs, else rank."""
    rank = cfg.conv_rank if cand.is_kxk_conv and cfg.conv_rank is not None else cfg.rank
    alpha = cfg.conv_alpha if cand.is_kxk_conv and cfg.conv_alpha is not None else cfg.alpha
    rank_override = _first_match(dict(cfg.rank_pattern), cand)
    alpha_override = _first_match(dict(cfg.alpha_pattern), cand)
    return (
        int(rank_override) if rank_override is not None else rank,
        float(alpha_override) if alpha_override is not None else alpha,
    )


def inject_loha(components: list[Component], cfg: NetworkConfig, *, seed: int | None = None) -> LoHaNetwork:
    """Freeze every component, wrap the selected modules in LoHa, and return the network of adapters.

    `seed` makes the factor initialisation reproducible without touching the global RNG.
    """
    for comp in components:
        comp.module.requires_grad_(False)
    targets = select_targets(components, cfg)
    network = LoHaNetwork()
    with _seeded(seed):
        for cand in targets:
            if cand.key in network.modules:
                raise InjectError(f"Two modules map to the same key {cand.key!r}: {cand.qualname}")
            rank, alpha = rank_alpha_for(cand, cfg)
            wrapped = wrap_layer(
                cand.module, rank, alpha, use_cp=cfg.use_cp,
                rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout,
                rank_dropout_scale=cfg.rank_dropout_scale,
                weight_decompose=cfg.weight_decompose, wd_on_output=cfg.wd_on_output,
            )  # fmt: skip
            _install(network, cand.key, cand, wrapped)
    return network


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed the factor initialisation when asked, leaving the global RNG as it was afterwards."""
    if seed is None:
        yield
        return
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(rng_state)


def _install(network: LoHaNetwork, key: str, cand: _Candidate, wrapped: LoHaModule) -> None:
    """Put the wrapper in the model in place of its base layer and record it in the network under `key`."""
    _set_submodule(cand.component.module, cand.path, wrapped)
    network.modules[key] = wrapped
    network.qualnames[key] = cand.qualname
    network.components[key] = cand.component.name


@dataclass(frozen=True)
class ExplicitTarget:
    """One module to wrap exactly as given, e.g. as a LoHa file names it, independent of presets and patterns."""

    key: str  # kohya key stem, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    rank: int
    alpha: float
    use_cp: bool = False  # CP form for a k x k conv (ignored for linears and 1x1 convs)
    weight_decompose: bool = False  # DoRA: the file carries a dora_scale
    wd_on_output: bool = True  # its dora_scale is per output row (else per input column)


def module_keys(components: list[Component]) -> dict[str, tuple[str, nn.Module]]:
    """Key stem -> (qualified name, module) of every Linear / Conv2d of `components` that a LoHa can wrap.

    Every accepted name is a key: for SDXL's UNet both the original-layout name and the diffusers one.
    """
    return {name: (c.qualname, c.module) for c in _all_candidates(components) for name in c.names}


def _all_candidates(components: list[Component]) -> list[_Candidate]:
    return [c for comp in components for c in _candidates(comp)]


def inject_explicit(
    components: list[Component], targets: Iterable[ExplicitTarget], *, seed: int | None = None
) -> LoHaNetwork:
    """Freeze every component and wrap exactly the modules `targets` name, each with its own rank, alpha and CP.

    The network's keys are the targets' own (a file's names, either layout for SDXL's UNet). A key that names no
    wrappable module of `components`, or two keys naming one module, is an InjectError listing every such key.
    """
    targets = list(targets)
    for comp in components:
        comp.module.requires_grad_(False)
    by_key = {name: c for c in _all_candidates(components) for name in c.names}
    duplicated = sorted(k for k, n in Counter(t.key for t in targets).items() if n > 1)
    if duplicated:
        raise InjectError(f"Keys given more than once: {', '.join(duplicated)}.")
    unknown = [t.key for t in targets if t.key not in by_key]
    if unknown:
        shown = ", ".join(unknown[:20]) + (f", ... ({len(unknown) - 20} more)" if len(unknown) > 20 else "")
        names = ", ".join(c.name for c in components)
        raise InjectError(f"{len(unknown)} key(s) name no Linear or Conv2d module of the {names}: {shown}.")
    same = Counter(by_key[t.key].qualname for t in targets)
    twice = [" and ".join(t.key for t in targets if by_key[t.key].qualname == q) for q, n in same.items() if n > 1]
    if twice:
        raise InjectError(f"Keys that name the same module: {'; '.join(twice)}.")
    network = LoHaNetwork()
    with _seeded(seed):
        for target in targets:
            cand = by_key[target.key]
            wrapped = wrap_layer(
                cand.module, target.rank, target.alpha, use_cp=target.use_cp,
                weight_decompose=target.weight_decompose, wd_on_output=target.wd_on_output,
            )  # fmt: skip
            _install(network, target.key, cand, wrapped)
    return network


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def remove_loha(components: list[Component]) -> None:
    """Put the base layers back where LoHa wrappers are (merged deltas stay in the weights)."""
    for comp in components:
        wrapped = [(p, m) for p, m in comp.module.named_modules() if isinstance(m, LoHaModule)]
        for path, module in wrapped:
            _set_submodule(comp.module, path, module.base)
