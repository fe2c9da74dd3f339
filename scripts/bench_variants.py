"""The worker side of scripts/bench.py: models, the per-variant adapter injectors, training steps, FLOP counts."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from bench_memory import current_memory, peak_memory, reset_peak_memory, timer, usage_since

from loha_train.models.reference_configs import SD1  # plain dicts, no torch: cheap in the parent

VARIANTS = ("loha_train", "peft", "peft_lora", "lycoris", "base", "loha_train_dora", "lycoris_dora")
DEFAULT_VARIANTS = VARIANTS[:5]  # the DoRA ones (network.weight_decompose, LyCORIS dora_wd) on request
LOHA_VARIANTS = ("loha_train", "peft", "lycoris")  # must agree on wrapped modules and parameter count
DTYPES = ("fp32", "bf16", "fp16")

# The SD1.5 architecture (the public repos' config.json values, shared with single-file loading); the parameter
# counts below pin it: a config that drifts fails the worker's assertion instead of benchmarking another model.
SD15_UNET: dict[str, Any] = SD1["unet"]
SD15_UNET_PARAMS = 859_520_964
CLIP_L_TEXT: dict[str, Any] = SD1["text_encoder"]  # OpenAI CLIP ViT-L/14 text tower
CLIP_L_TEXT_PARAMS = 123_060_480

# Dotted name suffixes of the adapted Linear/Conv2d modules (diffusers UNet, transformers CLIP text encoder).
UNET_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj",
)  # fmt: skip
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

TOKENS = 77
SEED = 1234
LR = 1e-4


def shared_config(args: argparse.Namespace) -> dict[str, Any]:
    """The settings every row shares (what the numbers mean)."""
    keys = ("model", "latent", "batch", "rank", "alpha", "steps", "warmup", "device", "dtype", "seed")
    cfg: dict[str, Any] = {k: getattr(args, k) for k in keys}
    cfg["gradient_checkpointing"] = args.gradient_checkpointing
    cfg["compile"] = getattr(args, "compile", False) and args.compile_backend
    cfg["text_encoder"] = args.text_encoder
    cfg["threads"] = args.threads or default_threads()
    cfg["unet_targets"] = list(UNET_TARGETS)
    cfg["te_targets"] = list(TE_TARGETS) if args.text_encoder else []
    cfg["optimizer"] = f"AdamW(lr={LR}, fused=True)"
    cfg["keep_freed_memory"] = args.keep_freed_memory
    cfg["rounds"] = getattr(args, "rounds", 1)
    return cfg


def default_threads() -> int:
    """The cores this process may run on (cgroup/affinity aware where the platform says)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------- the worker: models
def build_models(args: argparse.Namespace) -> Any:
    """A container with `unet` (and `text_encoder`), fp32, random weights from args.seed, frozen, train mode."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loha_train.models.builtin import TINY_CLIP_TEXT, TINY_SD_UNET

    sd15 = args.model == "sd15"
    torch.manual_seed(args.seed)
    models = torch.nn.Module()
    models.unet = UNet2DConditionModel(**(SD15_UNET if sd15 else TINY_SD_UNET))
    if sd15:
        _assert_params(models.unet, SD15_UNET_PARAMS, "SD1.5 UNet")
    if args.text_encoder:
        models.text_encoder = CLIPTextModel(CLIPTextConfig(**(CLIP_L_TEXT if sd15 else TINY_CLIP_TEXT)))
        if sd15:
            _assert_params(models.text_encoder, CLIP_L_TEXT_PARAMS, "CLIP-L text encoder")
    models.requires_grad_(False)
    return models.train()


def _assert_params(module: Any, expected: int, what: str) -> None:
    count = sum(p.numel() for p in module.parameters())
    if count != expected:
        raise AssertionError(f"{what}: {count:,} parameters, expected {expected:,}: the architecture is wrong")


def target_suffixes(models: Any) -> dict[str, tuple[str, ...]]:
    """Component name -> adapted module suffixes."""
    out = {"unet": UNET_TARGETS}
    if hasattr(models, "text_encoder"):
        out["text_encoder"] = TE_TARGETS
    return out


def suffix_regex(suffixes: tuple[str, ...]) -> str:
    """`.(a|b|c)` at the end of a dotted module name."""
    return r"\.(" + "|".join(re.escape(s) for s in suffixes) + r")$"


def expected_targets(models: Any) -> list[str]:
    """Names (in the container) of the Linear/Conv2d modules every adapter variant must wrap."""
    from torch import nn

    names = []
    for comp, suffixes in target_suffixes(models).items():
        pattern = re.compile(suffix_regex(suffixes))
        for name, module in getattr(models, comp).named_modules():
            if isinstance(module, nn.Linear | nn.Conv2d) and pattern.search("." + name):
                names.append(f"{comp}.{name}")
    return sorted(names)


# ----------------------------------------------------------------------------------------- the worker: adapters
# Each injector wraps the expected modules in place and returns (wrapped container names, extra modules that
# own parameters outside the container). Adapter parameters are created in fp32 on the model's device.


def inject_loha_train(models: Any, args: argparse.Namespace, dora: bool = False) -> tuple[list[str], list[Any]]:
    from loha_train.config import NetworkConfig
    from loha_train.fileformat.keys import sd_components
    from loha_train.loha.inject import inject_loha

    targets = tuple(suffix_regex(s) for s in target_suffixes(models).values())
    cfg = NetworkConfig(
        preset="none", targets=targets, rank=args.rank, alpha=args.alpha,
        conv_rank=args.rank, conv_alpha=args.alpha, use_cp=True, weight_decompose=dora,
    )  # fmt: skip
    tes = [models.text_encoder] if hasattr(models, "text_encoder") else []
    network = inject_loha(sd_components(models.unet, tes), cfg, seed=args.seed)
    return list(network.qualnames.values()), []


def _peft_regex(models: Any) -> str:
    """One regex PEFT full-matches against container names."""
    parts = [f"{comp}.*{suffix_regex(s).removesuffix('$')}" for comp, s in target_suffixes(models).items()]
    return "|".join(f"(?:{p})" for p in parts)


def inject_peft(models: Any, args: argparse.Namespace) -> tuple[list[str], list[Any]]:
    from peft import LoHaConfig, inject_adapter_in_model
    from peft.tuners.loha.layer import LoHaLayer

    cfg = LoHaConfig(r=args.rank, alpha=args.alpha, target_modules=_peft_regex(models), use_effective_conv2d=True)
    inject_adapter_in_model(cfg, models)
    return [n for n, m in models.named_modules() if isinstance(m, LoHaLayer)], []


def inject_peft_lora(models: Any, args: argparse.Namespace) -> tuple[list[str], list[Any]]:
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora.layer import LoraLayer

    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=_peft_regex(models))
    inject_adapter_in_model(cfg, models)
    return [n for n, m in models.named_modules() if isinstance(m, LoraLayer)], []


def inject_lycoris(models: Any, args: argparse.Namespace, dora: bool = False) -> tuple[list[str], list[Any]]:
    import logging

    from lycoris import LycorisNetwork
    from lycoris.logging import logger

    logger.setLevel(logging.WARNING)
    names = {id(m): n for n, m in models.named_modules()}
    # Class-level state: target exactly these names (re.match from the start), no class-based targets.
    LycorisNetwork.apply_preset(
        {
            "enable_conv": True,
            "target_module": [],
            "target_name": [f"{comp}\\..*{suffix_regex(s)}" for comp, s in target_suffixes(models).items()],
            "module_algo_map": {},
            "name_algo_map": {},
            "exclude_name": [],
            "lora_prefix": "lycoris",
            "use_fnmatch": False,
        }
    )
    network = LycorisNetwork(
        models, multiplier=1.0, lora_dim=args.rank, conv_lora_dim=args.rank, alpha=args.alpha,
        conv_alpha=args.alpha, use_tucker=True, network_module="loha", weight_decompose=dora,
    )  # fmt: skip
    network.apply_to()
    return [names[id(lora.org_module[0])] for lora in network.loras], [network]


INJECTORS: dict[str, Callable[[Any, argparse.Namespace], tuple[list[str], list[Any]]]] = {
    "loha_train": inject_loha_train,
    "peft": inject_peft,
    "peft_lora": inject_peft_lora,
    "lycoris": inject_lycoris,
    "loha_train_dora": lambda models, args: inject_loha_train(models, args, dora=True),
    "lycoris_dora": lambda models, args: inject_lycoris(models, args, dora=True),
}


def trainable_parameters(modules: list[Any]) -> list[Any]:
    """Parameters with requires_grad across the modules, each once."""
    seen: dict[int, Any] = {}
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


def cast_frozen_(modules: list[Any], dtype: Any) -> None:
    """Cast frozen floating-point parameters (the base weights) to dtype; trainable ones stay fp32."""
    for module in modules:
        for p in module.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)


# -------------------------------------------------------------------------------------------- the worker: steps
def make_batch(args: argparse.Namespace, models: Any, step: int, device: Any) -> dict[str, Any]:
    """Inputs for one step, from a generator seeded by (seed, step): identical across variants."""
    import torch

    gen = torch.Generator().manual_seed(args.seed * 1000 + step)
    shape = (args.batch, models.unet.config.in_channels, args.latent, args.latent)
    batch = {
        "latents": torch.randn(shape, generator=gen),
        "target": torch.randn(shape, generator=gen),
        "timesteps": torch.randint(0, 1000, (args.batch,), generator=gen),
    }
    if hasattr(models, "text_encoder"):
        vocab = models.text_encoder.config.vocab_size
        batch["input_ids"] = torch.randint(0, vocab, (args.batch, TOKENS), generator=gen)
    else:
        dim = models.unet.config.cross_attention_dim
        batch["encoder_hidden_states"] = torch.randn(args.batch, TOKENS, dim, generator=gen)
    return {k: v.to(device) for k, v in batch.items()}


def train_step(models: Any, batch: dict[str, Any], optimizer: Any, autocast: Any, is_base: bool) -> float:
    """Forward, MSE loss, backward, then AdamW step + zero_grad (base: backward to the input only)."""
    import torch.nn.functional as F

    latents = batch["latents"].requires_grad_(is_base)
    with autocast():
        if "input_ids" in batch:
            context = models.text_encoder(batch["input_ids"]).last_hidden_state
        else:
            context = batch["encoder_hidden_states"]
        pred = models.unet(latents, batch["timesteps"], encoder_hidden_states=context).sample
    loss = F.mse_loss(pred.float(), batch["target"].float())
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    latents.grad = None
    return float(loss.detach())


# --------------------------------------------------------------------------------------------- the worker: main
def prepare(args: argparse.Namespace, variant: str) -> tuple[Any, list[Any], list[str], dict[str, float]]:
    """Build, inject, enable checkpointing, cast and move: (models, trainable params, wrapped names, timings)."""
    import torch

    t0 = time.perf_counter()
    models = build_models(args)
    t1 = time.perf_counter()
    expected = expected_targets(models)
    wrapped, extra = INJECTORS[variant](models, args) if variant != "base" else ([], [])
    t2 = time.perf_counter()
    if variant != "base" and sorted(wrapped) != expected:
        missing, unexpected = sorted(set(expected) - set(wrapped)), sorted(set(wrapped) - set(expected))
        raise AssertionError(f"{variant}: wrapped set differs; missing {missing[:5]}, unexpected {unexpected[:5]}")
    if args.gradient_checkpointing:
        enable_checkpointing(models)
    if variant == "base" and hasattr(models, "text_encoder"):
        models.text_encoder.enable_input_require_grads()  # backward reaches the text encoder's frozen layers
    owners = [models, *extra]
    cast_frozen_(owners, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype])
    for module in owners:
        module.to(args.device)
    if args.compile:  # as loha-train's train.compile does, for every variant alike
        from loha_train.training.setup import compile_model

        compile_model(models.unet, args.compile_backend)
    params = trainable_parameters(owners)
    return models, params, wrapped, {"build_s": t1 - t0, "inject_s": t2 - t1}


def enable_checkpointing(models: Any) -> None:
    models.unet.enable_gradient_checkpointing()
    if hasattr(models, "text_encoder"):
        te = models.text_encoder
        enable = getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable
        enable()


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    variant = args.worker
    torch.set_num_threads(args.threads or default_threads())
    models, params, wrapped, setup = prepare(args, variant)
    if variant != "base" and not params:
        raise AssertionError(f"{variant}: no trainable parameters after injection")
    # fused AdamW for every adapter variant alike: loha-train's trainer steps with it (runtime.build_optimizer)
    optimizer = torch.optim.AdamW(params, lr=LR, fused=True) if variant != "base" else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    autocast: Callable[[], Any] = (
        (lambda: torch.autocast(args.device, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    )
    setup_mem, setup_peak = current_memory(args.device), peak_memory(args.device)
    span_ok = reset_peak_memory(args.device)
    now = timer(args.device)
    times, cpu_times, faults, losses = [], [], [], []
    for step in range(args.warmup + args.steps):
        batch = make_batch(args, models, step, args.device)
        usage, start = resource.getrusage(resource.RUSAGE_SELF), now()
        losses.append(train_step(models, batch, optimizer, autocast, variant == "base"))
        times.append(now() - start)
        cpu, minflt = usage_since(usage)
        cpu_times.append(cpu)
        faults.append(minflt)
        print(
            f"[bench] {variant}: step {step} {times[-1]:.3f} s (cpu {cpu:.2f} s, {minflt} page faults) "
            f"loss {losses[-1]:.6f}",
            file=sys.stderr,
            flush=True,
        )
    train_peak = peak_memory(args.device) if span_ok else None
    process_peak = max(peak_memory(args.device), setup_peak)
    if args.profile is not None:  # after the memory readings: the profiler holds memory of its own
        profile_step(args, models, optimizer, autocast, variant)
    gflops = count_flops(args, models, optimizer, autocast, variant) / 1e9 if args.flops else None
    measured = times[args.warmup :]
    names = sorted(wrapped)
    return {
        "variant": variant,
        "median_s": statistics.median(measured),
        "mean_s": statistics.fmean(measured),
        "min_s": min(measured),
        "median_cpu_s": statistics.median(cpu_times[args.warmup :]),
        "step_cpu_s": cpu_times[args.warmup :],
        "step_page_faults": faults[args.warmup :],
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "step_times_s": measured,
        "warmup_times_s": times[: args.warmup],
        "losses": losses,
        "peak_mem_bytes": process_peak,
        "train_peak_mem_bytes": train_peak,
        "setup_mem_bytes": setup_mem,
        "setup_peak_mem_bytes": setup_peak,
        "gflops_per_step": gflops,
        "trainable_params": sum(p.numel() for p in params),
        "trainable_tensors": len(params),
        "wrapped_modules": len(names),
        "wrapped_names_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
        **setup,
        "torch": torch.__version__,
        "config": shared_config(args),
    }


def profile_step(args: argparse.Namespace, models: Any, optimizer: Any, autocast: Any, variant: str) -> None:
    """One extra (unmeasured) step under torch.profiler; the op table goes to <profile>/<variant>.txt."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    batch = make_batch(args, models, args.warmup + args.steps, args.device)
    with profile(activities=activities, record_shapes=True) as prof:
        train_step(models, batch, optimizer, autocast, variant == "base")
    sort = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    args.profile.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=60, max_name_column_width=40)
    (args.profile / f"{variant}.txt").write_text(
        prof.key_averages().table(sort_by=sort, row_limit=40) + "\n\nby input shape:\n" + table + "\n"
    )


def count_flops(args: argparse.Namespace, models: Any, optimizer: Any, autocast: Any, variant: str) -> int:
    """FLOPs of one extra (unmeasured) step as torch.utils.flop_counter counts them (matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    _count_onednn_linear()
    batch = make_batch(args, models, args.warmup + args.steps, args.device)
    with FlopCounterMode(display=False) as counter:
        train_step(models, batch, optimizer, autocast, variant == "base")
    return int(counter.get_total_flops())


def _count_onednn_linear() -> None:
    """Teach the FLOP counter oneDNN's linear (loha_train's CPU products), which it does not know: 2 m k n."""
    import torch
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or op.default in flop_registry:
        return

    @register_flop_formula(op)
    def _linear_flop(x_shape: Any, w_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return 2 * math.prod(x_shape) * w_shape[0]
