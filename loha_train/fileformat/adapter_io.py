"""LoHa adapters <-> LyCORIS/kohya .safetensors: tensors, alpha, dtype, addnet hashes, validation, atomic writes."""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize
from torch import Tensor

from loha_train.fileformat.metadata import build_metadata, network_summary
from loha_train.loha.inject import InjectError, LoHaNetwork

__all__ = [
    "AdapterError",
    "adapter_tensors",
    "addnet_hashes",
    "apply_adapter",
    "build_metadata",
    "load_adapter",
    "network_summary",
    "save_adapter",
    "tensor_data_sha256",
    "validate_loha",
    "write_atomic",
]

logger = logging.getLogger(__name__)

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
CORES = ("hada_t1", "hada_t2")
SUFFIXES = (*FACTORS, *CORES, "alpha", "dora_scale")  # dora_scale: DoRA's magnitude (LyCORIS dora_wd)
PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
EXPECTED = (
    "a LoHa adapter in the LyCORIS/kohya layout: <prefix><module>.hada_w1_a, .hada_w1_b, .hada_w2_a, .hada_w2_b "
    "(+ .hada_t1, .hada_t2 for CP convs, .dora_scale for DoRA) and .alpha, with prefixes lora_unet_, lora_te_, "
    "lora_te1_ or lora_te2_"
)
LEGACY_HASH_OFFSET, LEGACY_HASH_SIZE = 0x100000, 0x10000


class AdapterError(Exception):
    """An adapter file that cannot be read, is not LoHa, or does not fit the model; the message names the file."""


# ------------------------------------------------------------------------------------------------------ saving
def adapter_tensors(network: LoHaNetwork, dtype: str = "fp16") -> dict[str, Tensor]:
    """The file's tensors: factors cast to `dtype`, alpha as a 0-dim float32 (the scale stays exact), on the CPU.

    Consumers read alpha with `.item()` (WebUI, ComfyUI) or `float()` (lycoris-lora), so its dtype may differ
    from the factors'; keeping it float32 means alpha / rank is the trained scale at every save precision.
    """
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"save precision must be one of {', '.join(SAVE_DTYPES)}, got {dtype!r}")
    out = {}
    for key, tensor in network.state_dict().items():
        target = torch.float32 if key.endswith(".alpha") else SAVE_DTYPES[dtype]
        out[key] = tensor.detach().to("cpu", target).contiguous()
    return out


def addnet_hashes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya sd-scripts precomputes them and WebUI reads them.

    Both are taken from the file serialised with only its `ss_*` metadata (sd-scripts'
    `precalculate_safetensors_hashes`): the model hash is the sha256 of every byte after the header, which is
    the tensor data alone and so equals the hash of the final file; the legacy hash is the first 8 hex digits
    of the sha256 of the 64 KiB at offset 1 MiB of that serialisation (of no bytes, for smaller files).
    """
    training_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = serialize(dict(tensors), training_only)
    return tensor_data_sha256(io.BytesIO(data)), _legacy_hash(data)


def tensor_data_sha256(stream: io.BufferedIOBase | io.BytesIO) -> str:
    """sha256 (hex) of everything after a safetensors header: u64 little-endian length N, then bytes 8 + N on."""
    stream.seek(0)
    header_len = int.from_bytes(stream.read(8), "little")
    stream.seek(8 + header_len)
    digest = hashlib.sha256()
    while chunk := stream.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def _legacy_hash(data: bytes) -> str:
    window = data[LEGACY_HASH_OFFSET : LEGACY_HASH_OFFSET + LEGACY_HASH_SIZE]
    return hashlib.sha256(window).hexdigest()[:8]


def save_adapter(
    network: LoHaNetwork, path: str | Path, *, dtype: str = "fp16", metadata: Mapping[str, str] | None = None
) -> Path:
    """Write `network` as a LyCORIS LoHa .safetensors at `path`, atomically; returns the path.

    `metadata` values must be strings (build_metadata makes them); `sshs_model_hash`, `sshs_legacy_hash` and
    `modelspec.hash_sha256` are added here because they depend on the bytes written.
    """
    path = Path(path)
    meta = dict(metadata or {})
    bad = sorted(k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str))
    if bad:
        raise TypeError(f"safetensors metadata values must be strings; not strings: {', '.join(map(str, bad))}")
    tensors = adapter_tensors(network, dtype)
    model_hash, legacy_hash = addnet_hashes(tensors, meta)
    meta |= {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash, "modelspec.hash_sha256": f"0x{model_hash}"}
    write_atomic(path, serialize(tensors, meta))
    logger.info("wrote %s (%d modules, %s)", path, len(network.modules), dtype)
    return path


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `<path>.tmp-<pid>` in the same folder, fsync it, then rename it over `path`.

    A crash leaves either the old file or the new one at `path`, never a mix; the temporary file is removed
    when anything fails, and one left by a killed process is removed by the next write of `path`. An OSError
    (a full disk) names `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_stale_temporaries(path: Path) -> None:
    """Delete `<path>.tmp-<pid>` files whose writer is gone (killed mid-write); live writers' files stay."""
    for tmp in path.parent.glob(f"{glob.escape(path.name)}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours: a leftover of an earlier failed write in this process
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate the process on Windows; keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _publish(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some filesystems cannot open folders; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------- loading
def load_adapter(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read and validate a LoHa .safetensors: (tensors by `<stem>.<suffix>`, metadata).

    A missing alpha is filled in as the rank (scale 1, as WebUI and ComfyUI treat it) with a warning; alpha
    comes back as a 0-dim float32. Anything else that is not a usable LoHa file raises AdapterError.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: no such file; expected {EXPECTED}.")
    if path.suffix != ".safetensors":
        raise AdapterError(f"{path}: not a .safetensors file; expected {EXPECTED}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(
            f"{path}: not a readable .safetensors file ({e}); it may be truncated or corrupt. Expected {EXPECTED}."
        ) from None
    return validate_loha(state, path), metadata


def validate_loha(state: Mapping[str, Tensor], source: str | Path) -> dict[str, Tensor]:
    """Check that `state` is a complete LoHa state in the kohya layout; return it with alpha normalised."""
    if not state:
        raise AdapterError(f"{source}: the file holds no tensors; expected {EXPECTED}.")
    foreign = _foreign_format(list(state))
    if foreign:
        raise AdapterError(f"{source}: this is {foreign}, not a LoHa adapter; expected {EXPECTED}.")
    groups: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        stem, _, suffix = key.partition(".")
        groups.setdefault(stem, {})[suffix] = tensor
    problems = [p for stem, group in groups.items() for p in _module_problems(stem, group)]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise AdapterError(f"{source}: not a usable LoHa adapter: {shown}. Expected {EXPECTED}.")
    out: dict[str, Tensor] = {}
    missing_alpha = []
    for stem, group in groups.items():
        out |= {f"{stem}.{suffix}": t for suffix, t in group.items() if suffix != "alpha"}
        if "alpha" in group:
            alpha = group["alpha"].reshape(()).float()
        else:
            missing_alpha.append(stem)
            alpha = torch.tensor(float(group["hada_w1_b"].shape[0]))
        out[f"{stem}.alpha"] = alpha
    if missing_alpha:
        logger.warning(
            "%s: %d module(s) have no alpha (e.g. %s); using alpha = rank (scale 1), as WebUI and ComfyUI do",
            source, len(missing_alpha), missing_alpha[0],
        )  # fmt: skip
    return out


def _foreign_format(keys: list[str]) -> str | None:
    """What a file that is not a kohya-layout LoHa is, from its keys, or None."""
    if any(
        k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
        for k in keys
    ):
        return "a full Stable Diffusion checkpoint (UNet/VAE/text-encoder weights)"
    if any(k.endswith((".lora_up.weight", ".lora_down.weight")) or ".lora_A." in k or ".lora_B." in k for k in keys):
        return "a LoRA/LoCon adapter (lora_up/lora_down tensors)"
    if any(".lokr_" in k for k in keys):
        return "a LoKr adapter (lokr_* tensors)"
    if any(k.startswith("base_model.model.") and ".hada_" in k for k in keys):
        return "a PEFT LoHa checkpoint (base_model.model.*.hada_* tensors, no per-module alpha)"
    if not any(".hada_" in k for k in keys):
        if any(
            k.startswith(("down_blocks.", "up_blocks.", "mid_block.", "text_model.", "encoder.", "decoder."))
            for k in keys
        ):
            return "a diffusers/transformers model weight file"
        return f"a file without any hada_* tensor (first keys: {', '.join(sorted(keys)[:3])})"
    return None


def _module_problems(stem: str, group: Mapping[str, Tensor]) -> list[str]:
    if stem.startswith("lycoris_"):
        return [f"{stem}: the lycoris_ prefix of LyCORIS's standalone wrapper, which WebUI and ComfyUI do not load"]
    if not stem.startswith(PREFIXES):
        return [f"{stem}: unknown prefix (not {', '.join(PREFIXES)})"]
    extra = sorted(set(group) - set(SUFFIXES))
    if extra:
        return [f"{stem}: unsupported tensors {', '.join(extra)}"]
    missing = [s for s in FACTORS if s not in group]
    if missing or (("hada_t1" in group) != ("hada_t2" in group)):
        return [f"{stem}: incomplete module, missing {', '.join(missing) or 'one of hada_t1/hada_t2'}"]
    if any(not t.is_floating_point() for t in group.values()):
        return [f"{stem}: non-floating-point tensors"]
    problems = _shape_problems(stem, group)
    if "alpha" in group and group["alpha"].numel() != 1:
        problems.append(f"{stem}.alpha: shape {tuple(group['alpha'].shape)}, expected a scalar")
    elif "alpha" in group and float(group["alpha"].reshape(())) == 0:
        problems.append(f"{stem}.alpha is 0 (WebUI/ComfyUI would drop the module, lycoris-lora would apply scale 1)")
    if not problems and not all(bool(torch.isfinite(t).all()) for t in group.values()):
        problems.append(f"{stem}: NaN or infinite values")
    return problems


def _shape_problems(stem: str, g: Mapping[str, Tensor]) -> list[str]:
    w1a, w1b, w2a, w2b = (g[s] for s in FACTORS)
    shapes = ", ".join(f"{s} {tuple(g[s].shape)}" for s in (*FACTORS, *CORES) if s in g)
    if w1a.shape != w2a.shape or w1b.shape != w2b.shape or w1a.ndim != 2 or w1b.ndim != 2:
        return [f"{stem}: inconsistent factor shapes ({shapes})"]
    rank = w1b.shape[0]
    if "hada_t1" in g:
        t1, t2 = g["hada_t1"], g["hada_t2"]
        if w1a.shape[0] != rank or t1.shape != t2.shape or t1.ndim != 4 or tuple(t1.shape[:2]) != (rank, rank):
            return [f"{stem}: inconsistent CP shapes ({shapes}); expected t (r, r, kh, kw), a (r, out), b (r, in)"]
    elif w1a.shape[1] != rank:
        return [f"{stem}: inconsistent factor shapes ({shapes}); expected a (out, r), b (r, in)"]
    if "dora_scale" in g and dora_axis(g) is None:
        return [f"{stem}.dora_scale: shape {tuple(g['dora_scale'].shape)} is neither (out, 1, ...) nor (1, in, ...)"]
    return []


def dora_axis(g: Mapping[str, Tensor]) -> str | None:
    """A module's DoRA axis: "out" for a dora_scale per output row (out, 1, ...), "in" per input column (1, in, ...).

    None when the module has no dora_scale or its shape is neither. Out and in come from the factors (the CP
    form stores the `_a` factors transposed); a plain conv's `_b` factors hold in * kh * kw columns.
    """
    m = g.get("dora_scale")
    if m is None or m.ndim < 2:
        return None
    cp = "hada_t1" in g
    out = g["hada_w1_a"].shape[1 if cp else 0]
    in_flat = g["hada_w1_b"].shape[1]
    rest = m.shape[2:]
    if m.shape[0] == out and all(d == 1 for d in m.shape[1:]):
        return "out"
    if m.shape[0] == 1 and all(d == 1 for d in rest) and in_flat % m.shape[1] == 0:
        return "in"
    return None


def apply_adapter(network: LoHaNetwork, state: Mapping[str, Tensor], *, source: str | Path | None = None) -> None:
    """Copy a file's tensors into an injected network, converting dtypes; mismatches raise AdapterError."""
    try:
        network.load_state_dict(dict(state))
    except InjectError as e:
        raise AdapterError(f"{source or 'the adapter'}: {e}") from None
