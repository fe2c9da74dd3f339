"""The data side of a run: checked dataset, sampler and loader, validation set, and the filled latent/text caches."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from loha_train import data
from loha_train.config import Config, DataConfig
from loha_train.config.fs import write_problem
from loha_train.data.masks import MaskSource, mask_source
from loha_train.models import builtin
from loha_train.models.bundle import ModelBundle
from loha_train.models.detect import model_hash
from loha_train.models.encode import encode_captions, token_counts, vae_encode
from loha_train.training.progress import counter

logger = logging.getLogger(__name__)


@dataclass
class DataPipeline:
    """The checked dataset, its sampler and loader, and the optional validation set."""

    index: data.DatasetIndex
    data_cfg: DataConfig  # cfg.data with builtin: paths resolved
    dataset: data.ImageDataset
    sampler: data.BucketBatchSampler
    loader: DataLoader
    validation: data.ImageDataset | None
    problems: int  # bad files skipped (data.skip_bad_images)
    summary: str
    fingerprint: dict[str, Any]  # data.dataset_fingerprint of the checked index
    notes: tuple[str, ...] = ()  # plan lines about the data (captions longer than model.max_token_length)
    stream: data.StreamBatches | None = None  # data.streaming: sampler and loader, its state in each checkpoint


def resolve_data_config(cfg: DataConfig) -> DataConfig:
    """cfg with `builtin:` dataset names replaced by their generated folders."""
    updates: dict[str, Any] = {
        key: str(builtin.resolve_builtin(value))
        for key in ("path", "reg_path", "validation_path")
        if isinstance(value := getattr(cfg, key), str) and builtin.is_builtin(value)
    }
    if any(builtin.is_builtin(sub.path) for sub in cfg.subsets):
        updates["subsets"] = tuple(
            dataclasses.replace(sub, path=str(builtin.resolve_builtin(sub.path)))
            if builtin.is_builtin(sub.path)
            else sub
            for sub in cfg.subsets
        )
    return dataclasses.replace(cfg, **updates) if updates else cfg


def preflight_sources(cfg: DataConfig) -> None:
    """Fail before any model loads when an hf: source is not in the local cache (an offline lookup, milliseconds)."""
    for source in data.source_configs(cfg):
        path = source.cfg.path or ""
        if data.sources.is_hub(path):
            data.sources.resolve_hub(path, cfg.hf_split, cfg.hf_revision, cfg.hf_config, source.key)


def build_data(cfg: Config, bundle: ModelBundle, accelerator: Any, *, encode: bool = True) -> DataPipeline:
    """Scan and check every image up front, then (unless `encode` is False) fill the latent/text caches."""
    data_cfg = resolve_data_config(cfg.data)
    seed = cfg.train.seed
    if data_cfg.streaming:
        return _stream_data(cfg, data_cfg, accelerator)
    index = data.scan_dataset(data_cfg, seed)
    with counter("checking images", enabled=accelerator.is_main_process) as progress:
        report = data.check_images(index, skip_bad=data_cfg.skip_bad_images, progress=progress)
    index = report.index
    masks = mask_source(data_cfg, index.train + index.reg, optional=index.validation)
    latents = _latent_cache(cfg, data_cfg, bundle, masks) if data_cfg.cache_latents != "none" else None
    text_id = f"{_identity(cfg, 'text')}|tokens {cfg.model.max_token_length}"
    text = data.TextEmbeddingCache(text_id, cfg.model.clip_skip) if _can_cache_text(cfg) else None
    train_items = index.train + index.reg
    dataset = data.ImageDataset(train_items, data_cfg, seed, latents=latents, text=text, masks=masks)
    validation = (
        data.ImageDataset(index.validation, data_cfg, seed, augment=False, latents=latents, text=text, masks=masks)
        if index.validation
        else None
    )
    if encode:
        _fill_caches(bundle, accelerator, latents, text, dataset, validation, data_cfg, index, cfg)
    sampler = data.BucketBatchSampler(
        dataset.items,
        dataset.buckets,
        cfg.train.batch_size,
        seed,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=data.collate,
        num_workers=data_cfg.num_workers,
        worker_init_fn=data.ignore_stop_signals,
    )
    summary = (
        f"{len(index.train)} images ({index.layout} layout), {len(index.reg)} regularization, "
        f"{len(index.validation)} validation; {len(set(dataset.buckets))} bucket(s); "
        f"{sampler.samples_per_epoch} samples per epoch"
        + _small_images(dataset, data_cfg)
        + (masks.summary(train_items) if masks is not None else "")
        + (f"; {len(report.problems)} bad file(s) skipped" if report.problems else "")
    )
    fingerprint = data.dataset_fingerprint(index)
    captions = [item.caption for item in train_items]
    notes = source_notes(index, dataset) + caption_notes(cfg, bundle, captions, list_longest=not encode)
    return DataPipeline(
        index, data_cfg, dataset, sampler, loader, validation, len(report.problems), summary, fingerprint, notes
    )


def _stream_data(cfg: Config, data_cfg: DataConfig, accelerator: Any) -> DataPipeline:
    """data.streaming: nothing is read up front; each process streams its part of the table."""
    path = data_cfg.path or ""
    kind = data.sources.detect_source(path)
    if data_cfg.subsets or data_cfg.reg_path or kind not in ("saved", "table", "shards", "hub"):
        raise data.DataError(
            "data.streaming reads one table source in data.path (a parquet/arrow/jsonl/csv file or folder of shards, "
            f"a save_to_disk folder or hf:OWNER/NAME); got {path} ({kind}"
            + (", with subsets or reg_path" if data_cfg.subsets or data_cfg.reg_path else "")
            + "). Set data.streaming: false for folders, subsets and regularization images."
        )
    spec = data.sources.tables.locate(
        path, kind, data_cfg.hf_split, data_cfg.hf_revision, data_cfg.hf_config, "data.path"
    )
    if isinstance(spec, Path):
        raise data.DataError(f"data.path: {path} is an image folder in the cache; set data.streaming: false")
    world, rank = accelerator.num_processes, accelerator.process_index
    stream = data.StreamBatches(spec, data_cfg, cfg.train.batch_size, cfg.train.seed, rank, world)
    validation = None
    if data_cfg.validation_path:
        held = dataclasses.replace(data_cfg, path=data_cfg.validation_path, validation_path=None, streaming=False)
        checked = data.check_images(data.scan_dataset(held), skip_bad=data_cfg.skip_bad_images).index
        validation = data.ImageDataset(checked.train, data_cfg, cfg.train.seed, augment=False)
    index = data.DatasetIndex(config=data_cfg, layout="table", train=())
    fingerprint = {"images": 0, "reg_images": 0, "validation_images": len(validation or ()), "repeats": 0,
                   "reg_repeats": 0, "sha256": data.stream_fingerprint(spec)}  # fmt: skip
    summary = (
        f"streaming {spec.location} ({spec.format}, {len(spec.files)} file(s)), split over {world} process(es); "
        f"aspect buckets filled from a buffer of {data_cfg.stream_buffer} samples; latents encoded on the fly; "
        "the epoch length is unknown until the stream ends"
    )
    dataset = data.ImageDataset((), data_cfg, cfg.train.seed)
    return DataPipeline(index, data_cfg, dataset, stream, stream, validation, 0, summary, fingerprint, stream=stream)  # type: ignore[arg-type]


def stream_state(pipeline: DataPipeline, accelerator: Any) -> list[dict[str, Any]] | None:
    """Every process's stream state (rank order), for the checkpoint; None without streaming."""
    if pipeline.stream is None:
        return None
    state = pipeline.stream.state_dict()
    if accelerator.num_processes == 1:
        return [state]
    from accelerate.utils import gather_object

    return list(gather_object([state]))


def restore_stream(pipeline: DataPipeline, accelerator: Any, extra: dict[str, Any]) -> None:
    """Put this process's stream where the checkpoint left it (its own state, by rank)."""
    if pipeline.stream is None:
        return
    states = extra.get("stream")
    if not states or len(states) != accelerator.num_processes:
        raise data.DataError(
            "cannot resume a streaming run from this checkpoint: it holds no stream state for "
            f"{accelerator.num_processes} process(es) (a stream resumes with the number of processes it was saved with)"
        )
    pipeline.stream.load_state_dict(states[accelerator.process_index])


def source_notes(index: data.DatasetIndex, dataset: data.ImageDataset) -> tuple[str, ...]:
    """One plan line per source and subset: kind, images, repeats, missing captions, bad rows; its buckets."""
    if len(index.sources) < 2 and all(s.kind in ("folder", "kohya", "metadata") for s in index.sources):
        return ()  # one folder: the data line says it all
    bucket_of = {item.key: bucket for item, bucket in zip(dataset.items, dataset.buckets, strict=True)}
    lines = []
    for source in index.sources:
        items = [i for i in index.train + index.reg if i.key.startswith(_key_prefix(source.key) + "/")]
        buckets = sorted({bucket_of[i.key] for i in items})
        repeats = "/".join(str(r) for r in source.repeats) or "-"
        lines.append(
            f"source {source.key} ({source.name}, {source.kind}{', regularization' if source.role == 'reg' else ''}): "
            f"{len(items)} images x {repeats} repeats, {source.missing_captions} without caption"
            + (f", {source.problems} bad" if source.problems else "")
            + f"; buckets {', '.join(f'{w}x{h}' for w, h in buckets) or 'none'}"
        )
    return tuple(lines)


def _key_prefix(config_key: str) -> str:
    """The item-key prefix of a source (data.path -> train, data.subsets[1].path -> subsets[1])."""
    fixed = {"data.path": "train", "data.reg_path": "reg"}
    return fixed.get(config_key, config_key.removeprefix("data.").removesuffix(".path"))


def caption_notes(cfg: Config, bundle: ModelBundle, captions: list[str], *, list_longest: bool) -> tuple[str, ...]:
    """One line counting the captions model.max_token_length cuts (said once, not per step), and for a dry run
    the three longest captions with their token counts."""
    if not captions or not bundle.tokenizers:
        return ()
    counts = token_counts(bundle.tokenizers[0], captions)
    limit = cfg.model.max_token_length
    cut = sum(n > limit for n in counts)
    notes = []
    if cut:
        notes.append(
            f"{cut} of {len(captions)} captions are longer than {limit} tokens and are truncated (longest "
            f"{max(counts)}); model.max_token_length: 150 or 225 keeps more, as kohya's max_token_length does"
        )
    if list_longest:
        longest = sorted(zip(counts, captions, strict=True), reverse=True)[:3]
        notes += [f"longest caption: {n} tokens: {caption[:80]!r}" for n, caption in longest]
    return tuple(notes)


def _small_images(dataset: data.ImageDataset, cfg: DataConfig) -> str:
    """How many images bucket_no_upscale put in their own bucket below bucket_min_side (kohya does the same)."""
    small = sum(1 for bucket in dataset.buckets if min(bucket) < cfg.bucket_min_side) if cfg.bucketing else 0
    return f"; {small} image(s) smaller than data.bucket_min_side in their own smaller bucket" if small else ""


def _can_cache_text(cfg: Config) -> bool:
    varies = any(data.captions_vary(rules) for rules in data.all_rules(cfg.data))
    cacheable = cfg.data.cache_text_embeddings and not cfg.data.streaming  # a stream's captions are not known up front
    return cacheable and not cfg.network.train_text_encoder and not varies


def _identity(cfg: Config, part: str) -> str:
    """A stable identity for cache keys: the base model's content hash (and the separate VAE's, if any)."""
    parts = [model_hash(cfg.model.path), part]
    if part == "vae" and cfg.model.vae_path:
        parts.append(model_hash(cfg.model.vae_path))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def latent_identity(cfg: Config, bundle: ModelBundle) -> str:
    """What makes a VAE's latents what they are, beyond the image and its crop (which LatentCache keys itself):
    the VAE's weights, the dtype it encodes in, and the encoding (the distribution's mode)."""
    return f"{_identity(cfg, 'vae')}|{str(bundle.vae.dtype).removeprefix('torch.')}|mode"


def _latent_cache(cfg: Config, data_cfg: DataConfig, bundle: ModelBundle, masks: MaskSource | None) -> data.LatentCache:
    folder = latent_cache_folder(cache_home(data_cfg)) if data_cfg.cache_latents == "disk" else None
    mode = data_cfg.cache_latents
    return data.LatentCache(mode, latent_identity(cfg, bundle), folder, masks=masks)  # type: ignore[arg-type]


def cache_home(cfg: DataConfig) -> str:
    """The data folder a disk cache belongs to: data.path's (or the first subset's); for a table file its folder;
    for an hf: id a folder named after it under $LOHA_TRAIN_CACHE."""
    path = cfg.path or cfg.subsets[0].path
    if path.startswith("hf:"):
        return str(builtin.cache_dir() / "hub" / path[3:].replace("/", "--"))
    return str(Path(path).parent) if Path(path).is_file() else path


def latent_cache_folder(data_path: str) -> Path:
    """<data>/.loha-cache/latents, or where the data folder is read-only (Kaggle inputs, shares, read-only mounts)
    a folder for this dataset under $LOHA_TRAIN_CACHE (default ~/.cache/loha-train); said in a warning."""
    preferred = data.default_cache_dir(data_path) / "latents"
    problem = write_problem(preferred)
    if problem is None:
        return preferred
    digest = hashlib.sha256(str(Path(data_path).resolve()).encode()).hexdigest()[:16]
    fallback = builtin.cache_dir() / "data" / digest / "latents"
    if (fallback_problem := write_problem(fallback)) is not None:
        raise data.DataError(
            f"data.cache_latents is 'disk', but the default cache folder {preferred} {problem}, and the fallback "
            f"{fallback} (under $LOHA_TRAIN_CACHE) {fallback_problem}. Set LOHA_TRAIN_CACHE to a writable folder, "
            "or set data.cache_latents: memory (or none)."
        )
    logger.warning(
        "the latent cache cannot go in the data folder (%s %s); it goes to %s instead (set LOHA_TRAIN_CACHE "
        "to choose another place, or data.cache_latents: memory)",
        preferred,
        problem,
        fallback,
    )
    return fallback


def _fill_caches(
    bundle: ModelBundle,
    accelerator: Any,
    latents: data.LatentCache | None,
    text: data.TextEmbeddingCache | None,
    dataset: data.ImageDataset,
    validation: data.ImageDataset | None,
    data_cfg: DataConfig,
    index: data.DatasetIndex,
    cfg: Config,
) -> None:
    """Encode what is not cached yet; with several processes each encodes its shard of the latents."""
    if latents is not None:
        entries = dataset.cache_entries() + (validation.cache_entries() if validation else [])
        _fill_latents(bundle, accelerator, latents, entries)
    if text is not None:
        captions = data.fixed_captions(index.train + index.reg + index.validation, data_cfg)

        def encode_text(chunk: list[str]) -> dict[str, torch.Tensor]:
            out = encode_captions(
                bundle.text_encoders, bundle.tokenizers, chunk, cfg.model.clip_skip, cfg.model.max_token_length
            )
            return {k: v.float().cpu() for k, v in out.items()}

        with counter("caching text embeddings", enabled=accelerator.is_main_process, unit="caption") as progress:
            text.prepare(captions, encode_text, progress=progress)


def _fill_latents(
    bundle: ModelBundle, accelerator: Any, latents: data.LatentCache, entries: list[tuple[Any, Any]]
) -> None:
    """Encode the latents not cached yet, each once over all processes.

    With several processes each encodes every world_size-th distinct entry. A memory cache then receives the
    other processes' shards (gathered); a disk cache finds them in its folder. The final pass encodes only what
    a process still misses: nothing, unless a disk cache folder is not shared (nodes with local disks).
    """

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return vae_encode(bundle, pixels).cpu()

    world, rank = accelerator.num_processes, accelerator.process_index
    if world > 1:
        distinct = list({latents.key(item, plan): (item, plan) for item, plan in entries}.values())
        mine = distinct[rank::world]
        with counter("caching latents", enabled=accelerator.is_main_process) as progress:
            stats = latents.prepare(mine, encode, progress=progress)
        logger.info("latents (rank %d): %d encoded, %d reused from the cache", rank, stats.encoded, stats.reused)
        if latents.mode == "memory":
            from accelerate.utils import gather_object

            for shard in gather_object([latents.export(mine)]):
                latents.absorb(shard)
        accelerator.wait_for_everyone()
    with counter("caching latents", enabled=accelerator.is_main_process) as progress:
        stats = latents.prepare(entries, encode, progress=progress)
    logger.info("latents: %d encoded, %d reused from the cache", stats.encoded, stats.reused)
