"""`loha-train inspect`: what a LoHa file holds, which base it targets, and whether WebUI/ComfyUI load it onto one."""

from __future__ import annotations

import contextlib
import datetime
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loha_train.fileformat.adapter_io import AdapterError, load_adapter
from loha_train.fileformat.consumer_dora import WRONG, dora_verdict
from loha_train.fileformat.consumers import (
    ConsumerCheck,
    ConsumerModel,
    Target,
    check_comfyui,
    check_webui,
    disagreements,
)
from loha_train.fileformat.spec import AdapterSpec, ModuleSpec, network_config_from_file

_CONV_NAME = re.compile(  # diffusers names, then the original (SGM) layout of SDXL files
    r"(conv_in|conv_out|conv1|conv2|conv_shortcut|samplers_0_conv|_op|in_layers_2|out_layers_3|skip_connection)$"
    r"|^lora_unet_(input_blocks_0_0|out_2|output_blocks_\d+_\d_conv)$"
)
_COMPONENTS = {"unet": "UNet", "te": "text encoder", "te1": "text encoder 1", "te2": "text encoder 2"}


@dataclass
class InspectReport:
    """Everything `inspect` shows; `ok` is False when a base was given and some key does not load onto it."""

    path: Path
    spec: AdapterSpec
    metadata: dict[str, str]
    file_size: int
    base: str | None = None
    base_family: str | None = None
    checks: list[ConsumerCheck] = field(default_factory=list)
    disagree: dict[str, list[Target]] = field(default_factory=dict)
    base_model: ConsumerModel | None = None
    dora: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)  # consumer -> stem -> (verdict, why)

    @property
    def family_mismatch(self) -> bool:
        return bool(self.base_family and self.spec.family and self.base_family != self.spec.family)

    @property
    def unmatched(self) -> int:
        """Keys some applicable consumer would not load (or two consumers load onto different weights)."""
        bad = {stem for c in self.checks if c.not_applicable is None for stem in c.unmatched} | set(self.disagree)
        return len(bad | self.dora_wrong)

    @property
    def dora_wrong(self) -> set[str]:
        """DoRA modules an applicable consumer loads but computes wrongly (WebUI with per-output-row dora_scale)."""
        applicable = {c.consumer for c in self.checks if c.not_applicable is None}
        return {s for c, v in self.dora.items() if c in applicable for s, (verdict, _) in v.items() if verdict == WRONG}

    @property
    def ok(self) -> bool:
        return self.base is None or (self.unmatched == 0 and not self.family_mismatch)

    def kind(self, module: ModuleSpec) -> str:
        """linear, conv (plain, 1x1 or k x k) or conv-cp; from the base model's weight when one was given."""
        if module.use_cp:
            return "conv-cp"
        if self.base_model is not None:
            for check in self.checks:
                if module.key in check.targets:
                    return "conv" if len(self.base_model.weight_shape(check.targets[module.key])) == 4 else "linear"
        if _CONV_NAME.search(module.key) or (
            module.key.endswith(("proj_in", "proj_out")) and self.spec.family == "sd1"
        ):
            return "conv"
        return "linear"


def consumer_model(base: str) -> ConsumerModel:
    """The base model in the single-file layout both consumers read: from the file itself, or converted."""
    from loha_train.config import ModelConfig
    from loha_train.models import layout, single_file
    from loha_train.models.detect import detect_model
    from loha_train.models.loading import load_models
    from loha_train.models.reference_configs import REFERENCE

    info = detect_model(base)
    if info.kind == "single_file":
        configs = json.loads(info.metadata.get(layout.METADATA_CONFIGS, "null")) or REFERENCE[info.family]
        return ConsumerModel(info.family, _file_shapes(info.path), dict(configs["unet"]))
    bundle = load_models(ModelConfig(path=base), dtype=torch.float16, with_tokenizers=False)  # shapes only
    weights = {k: tuple(v.shape) for k, v in single_file.ldm_state_dict(bundle).items()}
    return ConsumerModel(info.family, weights, dict(bundle.unet.config))


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = state.get("state_dict", state)
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def inspect_adapter(path: str | Path, base: str | None = None) -> InspectReport:
    """Read and validate `path`; with `base`, resolve every key the way WebUI and ComfyUI do on that model."""
    path = Path(path)
    if path.is_dir():
        raise AdapterError(_folder_message(path))
    state, metadata = load_adapter(path)
    spec = network_config_from_file(state, metadata)
    report = InspectReport(path, spec, metadata, path.stat().st_size, base=base)
    if base is not None:
        model = consumer_model(base)
        deltas = {key: m.delta_shape for key, m in spec.modules.items()}
        report.base_model, report.base_family = model, model.family
        report.checks = [check_webui(deltas, model), check_comfyui(deltas, model)]
        report.disagree = disagreements(*report.checks)
        report.dora = {
            c.consumer: {m.key: dora_verdict(c.consumer, m.dora) for m in spec.modules.values() if m.dora}
            for c in report.checks
        }
    return report


def _folder_message(folder: Path) -> str:
    """`inspect` was given a folder (an output.dir, most likely): say so and name the adapters inside it."""
    found = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("checkpoints/*/*.safetensors"))
    if not found:
        return f"{folder} is a folder, not a .safetensors file, and holds no .safetensors adapter."
    listed = "\n".join(f"  {p}" for p in found[:20]) + ("\n  ..." if len(found) > 20 else "")
    return f"{folder} is a folder; inspect one of the adapters inside it:\n{listed}"


# ------------------------------------------------------------------------------------------------ text form
def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _dtype(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _table(report: InspectReport) -> list[str]:
    rows = [("module", "kind", "rank", "alpha", "delta", "dtype", "params")]
    for m in report.spec.modules.values():
        rows.append(
            (
                m.key,
                report.kind(m) + ("+dora" if m.dora else ""),
                str(m.rank),
                f"{m.alpha:g}",
                _dims(m.delta_shape),
                _dtype(m.dtype),
                f"{m.params:,}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {2, 3, 6}
    return [
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]


def _totals(report: InspectReport) -> list[str]:
    modules = report.spec.modules.values()
    per: dict[str, list[int]] = {}
    for m in modules:
        per.setdefault(m.component, [0, 0])
        per[m.component][0] += 1
        per[m.component][1] += m.params
    lines = [f"{_COMPONENTS.get(c, c)}: {n} modules, {p:,} parameters" for c, (n, p) in per.items()]
    ranks = sorted({m.rank for m in modules})
    alphas = sorted({m.alpha for m in modules})
    dtypes = sorted({_dtype(m.dtype) for m in modules})
    total = sum(m.params for m in modules)
    lines.append(
        f"total: {len(report.spec.modules)} modules, {total:,} parameters, ranks {', '.join(map(str, ranks))}, "
        f"alphas {', '.join(f'{a:g}' for a in alphas)}, {'/'.join(dtypes)}, {report.file_size:,} bytes"
    )
    dora = [m for m in modules if m.dora]
    if dora:
        axes = sorted({"per output row" if m.dora == "out" else "per input column" for m in dora})
        lines.append(f"DoRA (weight decomposition): {len(dora)} of {len(report.spec.modules)} modules, "
                     f"dora_scale {' and '.join(axes)}")  # fmt: skip
    if "loha_train.weights" in report.metadata:
        lines.append(f"EMA: the file holds the {_ema_line(report.metadata)}")
    return lines


def _ema_line(metadata: dict[str, str]) -> str:
    """Which weights an EMA run exported, from loha_train.weights and loha_train.ema."""
    try:
        ema = json.loads(metadata.get("loha_train.ema", "{}"))
    except ValueError:
        ema = {}
    which = "EMA weights" if metadata["loha_train.weights"] == "ema" else "trained (not the EMA) weights"
    return f"{which} (decay {ema.get('decay', '?')}, {ema.get('updates', '?')} updates)"


def _short(value: str, limit: int = 110) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _summary(key: str, value: str) -> str:
    """A one-line rendering of a metadata value; JSON objects are summarised rather than dumped."""
    try:
        parsed = json.loads(value) if value.startswith(("{", "[")) else None
    except ValueError:
        return _short(value) + "  (invalid JSON)"
    if key == "ss_tag_frequency" and isinstance(parsed, dict):
        tags: dict[str, int] = {}
        for folder in parsed.values():
            for tag, n in folder.items():
                tags[tag] = tags.get(tag, 0) + int(n)
        top = sorted(tags, key=lambda t: -tags[t])[:5]
        return f"{len(tags)} tags in {len(parsed)} folder(s); top: " + ", ".join(f"{t} ({tags[t]})" for t in top)
    if key == "ss_bucket_info" and isinstance(parsed, dict):
        buckets = parsed.get("buckets", {}).values()
        return ", ".join(f"{_dims(tuple(b['resolution']))}: {b['count']}" for b in buckets)
    if parsed is not None:
        return _short(json.dumps(parsed, ensure_ascii=False, separators=(",", ":")))
    if key in ("ss_training_started_at", "ss_training_finished_at"):
        with contextlib.suppress(ValueError, OverflowError, OSError):
            when = datetime.datetime.fromtimestamp(float(value), datetime.timezone.utc)
            return f"{value} ({when:%Y-%m-%d %H:%M} UTC)"
    return _short(value)


def _provenance(metadata: dict[str, str]) -> list[str]:
    lines = []
    for key in sorted(k for k in metadata if k.startswith("loha_train.")):
        value = metadata[key]
        if key == "loha_train.config":
            try:
                config = json.loads(value)
                lines.append(f"  {key}:")
                for section, fields in config.items():
                    body = (
                        fields
                        if not isinstance(fields, dict)
                        else " ".join(f"{k}={json.dumps(v)}" for k, v in fields.items())
                    )
                    lines.append(f"    {section}: {body}")
                continue
            except (ValueError, AttributeError):
                pass
        if key == "loha_train.targets":
            try:
                targets = json.loads(value)
                counts = ", ".join(f"{c}: {n}" for c, n in targets.get("modules", {}).items())
                lines.append(
                    f"  {key}: {counts}; {len(targets.get('rank_alpha_overrides', {}))} rank/alpha override(s)"
                )
                continue
            except (ValueError, AttributeError):
                pass
        lines.append(f"  {key}: {_summary(key, value)}")
    return lines


def _metadata(metadata: dict[str, str]) -> list[str]:
    if not metadata:
        return ["Metadata: none"]
    groups = [
        ("Training (ss_*)", lambda k: k.startswith("ss_")),
        ("ModelSpec", lambda k: k.startswith("modelspec.")),
        ("Other", lambda k: not k.startswith(("ss_", "modelspec.", "loha_train."))),
    ]
    lines = []
    for title, pick in groups:
        keys = sorted(k for k in metadata if pick(k))
        if keys:
            lines.append(f"{title}:")
            lines += [f"  {k}: {_summary(k, metadata[k])}" for k in keys]
    provenance = _provenance(metadata)
    if provenance:
        lines += ["Provenance (loha_train.*):", *provenance]
    return lines


def _consumers(report: InspectReport) -> list[str]:
    total = len(report.spec.modules)
    lines = [f"Base model: {report.base} ({report.base_family})"]
    if report.family_mismatch:
        lines.append(f"  family: the file targets {report.spec.family}, the base model is {report.base_family}")
    for check in report.checks:
        loaded = total - len(check.unmatched)
        if check.not_applicable:
            lines.append(
                f"  {check.consumer}: not applicable ({check.not_applicable}); its rules load {loaded}/{total}"
            )
            continue
        lines.append(f"  {check.consumer}: {loaded}/{total} keys load, {len(check.unmatched)} unmatched")
        lines += [f"    {stem}: {why}" for stem, why in list(check.unmatched.items())[:10]]
        if len(check.unmatched) > 10:
            lines.append(f"    ... {len(check.unmatched) - 10} more")
    for consumer, verdicts in report.dora.items():
        counts: dict[str, list[str]] = {}
        for stem, (verdict, why) in verdicts.items():
            counts.setdefault(f"{verdict}: {why}", []).append(stem)
        for what, stems in counts.items():
            lines.append(f"  {consumer} DoRA: {len(stems)}/{len(verdicts)} modules {what}")
    for stem, targets in list(report.disagree.items())[:10]:
        lines.append(f"  disagree: {stem} -> " + " vs ".join(f"{k}{'' if p is None else f'[{p}]'}" for k, p in targets))
    verdict = "PASS" if report.ok else f"FAIL: {report.unmatched} unmatched key(s)"
    if report.dora_wrong:
        wrong = len(report.dora_wrong)
        verdict += f" ({wrong} of them DoRA modules applied wrongly; train with network.wd_on_output: false)"
    lines.append(f"Result: {verdict}")
    return lines


def format_report(report: InspectReport) -> str:
    """The human-readable report: module table, totals, target family, metadata, and the consumer check."""
    family = report.spec.family or "unknown"
    evidence = f" ({'; '.join(report.spec.evidence)})" if report.spec.evidence else ""
    lines = [f"{report.path}", "", *_table(report), "", *_totals(report), f"targets: {family}{evidence}", ""]
    lines += _metadata(report.metadata)
    if report.base is not None:
        lines += ["", *_consumers(report)]
    return "\n".join(lines)


def report_dict(report: InspectReport) -> dict[str, Any]:
    """The report as JSON-ready data (for `inspect --json`); JSON-valued metadata entries come parsed."""
    metadata: dict[str, Any] = {}
    for key, value in report.metadata.items():
        try:
            metadata[key] = json.loads(value) if value.startswith(("{", "[")) else value
        except ValueError:
            metadata[key] = value
    out: dict[str, Any] = {
        "file": str(report.path),
        "file_size": report.file_size,
        "family": report.spec.family,
        "family_evidence": list(report.spec.evidence),
        "modules": [
            {
                "key": m.key,
                "kind": report.kind(m),
                "rank": m.rank,
                "alpha": m.alpha,
                "cp": m.use_cp,
                "delta_shape": list(m.delta_shape),
                "shapes": {k: list(v) for k, v in m.shapes.items()},
                "dtype": _dtype(m.dtype),
                "params": m.params,
                "dora": m.dora,
            }
            for m in report.spec.modules.values()
        ],
        "totals": {"modules": len(report.spec.modules), "params": sum(m.params for m in report.spec.modules.values())},
        "metadata": metadata,
        "ok": report.ok,
    }
    if report.base is not None:
        out["base"] = {
            "model": report.base,
            "family": report.base_family,
            "unmatched": report.unmatched,
            "consumers": {
                c.consumer: {
                    "applicable": c.not_applicable is None,
                    "not_applicable": c.not_applicable,
                    "loaded": len(c.targets),
                    "unmatched": c.unmatched,
                }
                for c in report.checks
            },
            "disagree": {stem: [list(t) for t in targets] for stem, targets in report.disagree.items()},
            "dora": {c: {s: list(v) for s, v in verdicts.items()} for c, verdicts in report.dora.items()},
        }
    return out
