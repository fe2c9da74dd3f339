"""`loha-train merge`: bake a LoHa file into its base model and save a diffusers folder or a single file, atomically."""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from loha_train.fileformat.adapter_io import load_adapter
from loha_train.fileformat.keys import sd_components
from loha_train.fileformat.spec import inject_from_file
from loha_train.loha.inject import remove_loha
from loha_train.models.single_file import save_file_atomic

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_COPIED = (
    "tokenizer",
    "tokenizer_2",
    "scheduler",
    "feature_extractor",
    "safety_checker",
    "image_encoder",
    "model_index.json",
)


class MergeError(Exception):
    """An output path or option that merge cannot use."""


def merge_adapter(
    base: str,
    adapter: str | Path,
    out: str | Path,
    *,
    multiplier: float = 1.0,
    precision: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write base + multiplier * DeltaW of every module `adapter` names to `out`; returns `out`.

    The output is a single-file (LDM-layout) .safetensors when the base is a single file or `out` ends with
    .safetensors, else a diffusers folder that `StableDiffusionPipeline.from_pretrained` loads. A single-file base
    is patched (its other tensors and metadata kept). The merge is done in float32 and saved in `precision`
    (default fp32; a patched single file keeps each tensor's dtype). `out` is written under a temporary name and
    renamed into place; an existing `out` is only replaced with `overwrite`.
    """
    from loha_train.config import ModelConfig
    from loha_train.models.detect import detect_model
    from loha_train.models.loading import load_models
    from loha_train.models.single_file import ldm_state_dict, save_single_file

    out = Path(out)
    if not math.isfinite(multiplier):
        raise MergeError(f"--multiplier must be a finite number such as 0.8, got {multiplier}")
    if precision is not None and precision not in PRECISIONS:
        raise MergeError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise MergeError(f"{out}: already exists; pass --overwrite to replace it")
    state, metadata = load_adapter(adapter)
    info = detect_model(base)
    single_file = info.kind == "single_file" or out.suffix == ".safetensors"
    if single_file and out.suffix != ".safetensors":
        raise MergeError(
            f"{out}: the base {info.path} is a single file, so the merge is one too; name it *.safetensors"
        )
    if single_file and out.is_dir():
        raise MergeError(f"{out}: is a folder; a single-file merge needs a file path")
    bundle = load_models(ModelConfig(path=base), dtype=torch.float32, with_tokenizers=False)
    patch_base = info.kind == "single_file"
    before = {k: v.detach().clone() for k, v in ldm_state_dict(bundle).items()} if patch_base else {}
    components = sd_components(bundle.unet, bundle.text_encoders)
    network = inject_from_file(components, state, metadata, source=adapter, family=bundle.family)
    network.set_multiplier(multiplier)
    network.merge()
    remove_loha(components)
    merged = {"unet": bundle.unet, **{f"text_encoder{i or ''}": te for i, te in enumerate(bundle.text_encoders)}}
    # a patched single file keeps each tensor's dtype, which may be fp16: hold every weight to fp16's range then
    limit_dtype = PRECISIONS[precision] if precision else torch.float16 if patch_base else torch.float32
    refuse_non_finite(merged, adapter, multiplier, limit_dtype)
    logger.info("merged %d modules of %s at multiplier %g", len(network.modules), adapter, multiplier)
    if patch_base:
        dtype = PRECISIONS[precision] if precision else None
        return _patch_single_file(info.path, before, ldm_state_dict(bundle), out, dtype)
    if single_file:
        return save_single_file(bundle, out, dtype=PRECISIONS[precision or "fp32"])
    return _save_folder(bundle, info.path, out, PRECISIONS[precision or "fp32"])


def _patch_single_file(
    base: Path,
    before: dict[str, torch.Tensor],
    after: dict[str, torch.Tensor],
    out: Path,
    dtype: torch.dtype | None,
) -> Path:
    """The base file's own tensors and metadata, each tensor the merge changed plus that change (as kohya merges
    into the checkpoint's state dict): what the diffusers layout does not hold (SD 2.x's last OpenCLIP layer,
    logit_scale, EMA and other extra keys) is kept as it is, bit for bit. With `dtype` floating tensors are cast to
    it; without, each keeps its own dtype (a patched one is rounded back to it)."""
    tensors, metadata = _read_checkpoint(base)
    patched = 0
    for key, tensor in tensors.items():
        if key in after and not torch.equal(after[key], before[key]):
            if after[key].shape != tensor.shape:
                raise MergeError(
                    f"{base}: {key} has shape {tuple(tensor.shape)}, the merged model's is {tuple(after[key].shape)}; "
                    "this file's layout is not one loha-train converts"
                )
            own = tensor.dtype
            tensor, patched = (tensor.float() + (after[key] - before[key])).to(own), patched + 1
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        tensors[key] = tensor.contiguous()
    logger.info("patched %d tensors of %s", patched, base)
    return save_file_atomic(tensors, out, metadata)


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """Every tensor of a single-file checkpoint and its safetensors metadata (None for a .ckpt)."""
    from loha_train.models.detect import load_ckpt

    if path.suffix != ".safetensors":
        return {k: v for k, v in load_ckpt(path).items() if isinstance(v, torch.Tensor)}, None
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 (safe_open is no dict)


def refuse_non_finite(
    models: dict[str, torch.nn.Module], adapter: str | Path, multiplier: float, dtype: torch.dtype
) -> None:
    """Refuse to save a model with a NaN/inf weight, or one that `dtype` (fp16: |w| <= 65504) cannot hold."""
    limit = torch.finfo(dtype).max
    for component, model in models.items():
        for name, weight in model.state_dict().items():
            if not weight.is_floating_point():
                continue
            finite = torch.isfinite(weight)
            if finite.all() and weight.abs().max() <= limit:
                continue
            what = "is NaN or infinite" if not finite.all() else f"exceeds the largest {dtype} value ({limit:g})"
            raise MergeError(
                f"merging {adapter} at multiplier {multiplier:g} makes {component}.{name} unusable: it {what}. "
                "Nothing was written. Use a smaller --multiplier, --precision fp32, or check the adapter with "
                "`loha-train inspect`."
            )


def _save_folder(bundle: object, base_dir: Path, out: Path, dtype: torch.dtype) -> Path:
    """save_pretrained of each model, the base's tokenizers/scheduler/model_index copied; then renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        models = {"unet": bundle.unet, "vae": bundle.vae}  # type: ignore[attr-defined]
        for i, encoder in enumerate(bundle.text_encoders):  # type: ignore[attr-defined]
            models["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = encoder
        for name, model in models.items():
            if next(model.parameters()).dtype != dtype:
                model.to(dtype)
            model.save_pretrained(tmp / name)
        for name in _COPIED:
            source = base_dir / name
            if source.is_dir():
                shutil.copytree(source, tmp / name)
            elif source.is_file():
                shutil.copy2(source, tmp / name)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out`; an existing `out` is moved aside first and deleted only once `tmp` is in place."""
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()
