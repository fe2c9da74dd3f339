"""Latent and text-embedding caches: content-keyed, in memory or one safetensors file per entry on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from loha_train.config import DataConfig
from loha_train.data.buckets import CropPlan, load_pixels
from loha_train.data.captions import captions_vary
from loha_train.data.common import DataError, non_finite_latents
from loha_train.data.masks import MaskSource
from loha_train.data.scan import ImageItem

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the stored layout or the meaning of a key changes
CacheMode = Literal["memory", "disk"]
Progress = Callable[[int, int], None]


class CacheStats(NamedTuple):
    """What `prepare` did."""

    encoded: int  # entries computed by the callback this time
    reused: int  # entries already in the cache


def default_cache_dir(data_path: str | Path) -> Path:
    """<data folder>/.loha-cache, where the config documents disk caches to live by default."""
    return Path(data_path).expanduser() / ".loha-cache"


def _digest(fields: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class _TensorStore:
    """Named tensors by key: a dict in memory, or <folder>/<key>.safetensors written atomically."""

    def __init__(self, mode: CacheMode, folder: Path | None) -> None:
        if mode == "disk" and folder is None:
            raise ValueError("a disk cache needs a cache_dir")
        self.mode = mode
        self.folder = folder
        self._memory: dict[str, dict[str, torch.Tensor]] = {}

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        """In memory, or on disk with a readable header written for this key."""
        if self.mode == "memory":
            return key in self._memory
        try:
            with safe_open(self._path(key), framework="pt") as f:
                return (f.metadata() or {}).get("key") == key
        except (OSError, SafetensorError):
            return False

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        if self.mode == "memory":
            return self._memory.get(key)
        try:
            with safe_open(self._path(key), framework="pt") as f:
                return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        except (OSError, SafetensorError):
            return None

    def save(self, key: str, tensors: dict[str, torch.Tensor], description: dict[str, object]) -> None:
        tensors = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
        if self.mode == "memory":
            self._memory[key] = tensors
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        metadata = {"key": key, "description": json.dumps(description, sort_keys=True)}
        try:
            save_file(tensors, temporary, metadata=metadata)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


class LatentCache:
    """VAE latents per (image content, crop plan, VAE, dtype); reused across runs when nothing changed.

    The key hashes: the VAE identity string the caller passes (e.g. a hash of its weights and config),
    the image file's SHA-256 (content, not mtime: an edited image re-encodes, a moved one does not), the
    original, resized and target sizes, the crop position, the flip and the dtype. Stale entries are
    left on disk (harmless, never matched). With `masks` (masked loss) an entry also holds the image's loss
    mask under the same crop (`mask`, uint8 at pixel size), and the key covers the mask's source.
    """

    def __init__(
        self,
        mode: CacheMode,
        vae_id: str,
        cache_dir: Path | None = None,
        dtype: torch.dtype = torch.float32,
        masks: MaskSource | None = None,
    ) -> None:
        self._store = _TensorStore(mode, cache_dir)
        self.vae_id = vae_id
        self.dtype = dtype
        self.masks = masks
        self._keys: dict[tuple[Path, CropPlan], str] = {}

    @property
    def mode(self) -> CacheMode:
        return self._store.mode

    def key(self, item: ImageItem, plan: CropPlan) -> str:
        """The cache key of `item` cropped by `plan` (hashes the file when check_images did not)."""
        memo = (item.key, plan)
        if memo not in self._keys:
            self._keys[memo] = _digest(self._description(item, plan))
        return self._keys[memo]

    def _description(self, item: ImageItem, plan: CropPlan) -> dict[str, object]:
        mask = self.masks.identity(item) if self.masks is not None else None
        return ({"mask": mask} if mask is not None else {}) | {
            "format": CACHE_FORMAT,
            "kind": "latents",
            "vae": self.vae_id,
            "image_sha256": item.content_id(),  # table rows without a hash: dataset fingerprint + row
            "original": list(plan.original),
            "resized": list(plan.resized),
            "target": list(plan.target),
            "crop_left_top": [plan.left, plan.top],
            "flip": plan.flip,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def prepare(
        self,
        entries: Sequence[tuple[ImageItem, CropPlan]],
        encode: Callable[[torch.Tensor], torch.Tensor],
        *,
        batch_size: int = 4,
        progress: Progress | None = None,
    ) -> CacheStats:
        """Encode every entry not cached yet, batched per bucket.

        `encode` maps pixels (B, 3, H, W) in [-1, 1] to latents (B, C, H/8, W/8), already scaled the
        way training wants them; it is called under torch.no_grad(). `progress(done, total)` counts the
        images encoded so far.
        """
        todo: dict[str, tuple[ImageItem, CropPlan]] = {}
        seen = set()
        for item, plan in entries:
            key = self.key(item, plan)
            if key not in seen and not self._store.has(key):
                todo[key] = (item, plan)
            seen.add(key)
        groups: dict[tuple[int, int], list[str]] = defaultdict(list)
        for key, (_, plan) in todo.items():
            groups[plan.target].append(key)
        done = 0
        for target in sorted(groups):
            keys = groups[target]
            for start in range(0, len(keys), batch_size):
                chunk = keys[start : start + batch_size]
                self._encode_chunk(chunk, todo, encode)
                done += len(chunk)
                if progress is not None:
                    progress(done, len(todo))
        return CacheStats(encoded=len(todo), reused=len(seen) - len(todo))

    def _encode_chunk(
        self,
        keys: list[str],
        todo: dict[str, tuple[ImageItem, CropPlan]],
        encode: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        pixels = torch.stack([load_pixels(todo[k][0].image_source(), todo[k][1], todo[k][0].where) for k in keys])
        with torch.no_grad():
            latents = encode(pixels)
        if latents.shape[0] != len(keys):
            raise ValueError(f"encode returned {latents.shape[0]} latents for {len(keys)} images")
        for key, latent in zip(keys, latents, strict=True):
            item, plan = todo[key]
            if not torch.isfinite(latent).all():
                raise non_finite_latents(item.where)
            tensors = {"latents": latent.to(self.dtype)}
            mask = self.masks.load(item, plan) if self.masks is not None else None
            if mask is not None:
                tensors["mask"] = mask
            self._store.save(key, tensors, self._description(item, plan))

    def export(self, entries: Iterable[tuple[ImageItem, CropPlan]]) -> dict[str, dict[str, torch.Tensor]]:
        """The cached tensors (latents, and mask if any) of `entries` by key, for another process's `absorb`."""
        out = {}
        for item, plan in entries:
            key = self.key(item, plan)
            tensors = self._store.load(key)
            if tensors is not None:
                out[key] = tensors
        return out

    def absorb(self, entries: dict[str, dict[str, torch.Tensor]]) -> int:
        """Add entries another process encoded (from its `export`) that this cache lacks; returns how many."""
        added = 0
        for key, tensors in entries.items():
            if not self._store.has(key):
                tensors = {**tensors, "latents": tensors["latents"].to(self.dtype)}
                self._store.save(key, tensors, {"key": key, "shared": True})
                added += 1
        return added

    def get(self, item: ImageItem, plan: CropPlan) -> torch.Tensor:
        """The cached latents (C, h, w) of `item` under `plan`; DataError if `prepare` did not cover it."""
        return self.entry(item, plan)["latents"]

    def entry(self, item: ImageItem, plan: CropPlan) -> dict[str, torch.Tensor]:
        """`latents` (C, h, w) and, for a masked image, `mask` (H, W) uint8 of `item` under `plan`."""
        tensors = self._store.load(self.key(item, plan))
        if tensors is None:
            raise DataError(
                f"{item.where}: no cached latents for this crop; the latent cache was not prepared for it "
                "(random crop needs data.cache_latents: none) or its file was removed during the run"
            )
        return tensors


def fixed_captions(items: Iterable[ImageItem], cfg: DataConfig) -> list[str]:
    """Every caption training can use when captions are fixed: each item's, plus "" for caption dropout."""
    items = tuple(items)
    if any(captions_vary(rules) for rules in _rules_of(items, cfg)):
        raise DataError(
            "text embeddings can only be cached for fixed captions: turn off data.shuffle_captions, "
            "data.tag_dropout and data.caption_wildcards, or set data.cache_text_embeddings: false"
        )
    captions = {item.caption for item in items}
    if any(rules.caption_dropout > 0 for rules in _rules_of(items, cfg)):
        captions.add("")
    return sorted(captions)


def _rules_of(items: Iterable[ImageItem], cfg: DataConfig) -> list[DataConfig]:
    """The top-level rules and each subset's that `items` use."""
    return [cfg, *{id(i.rules): i.rules for i in items if i.rules is not None}.values()]


class TextEmbeddingCache:
    """Text-encoder outputs per exact caption string, for a frozen text encoder and fixed captions.

    The key hashes the identity string the caller passes (which must cover the text encoder(s), the
    tokenizer(s) and anything else that changes the output, such as the max length), clip_skip and the
    exact caption. Memory by
    default; `mode="disk"` keeps them across runs under `cache_dir`.
    """

    def __init__(
        self, encoder_id: str, clip_skip: int = 1, *, mode: CacheMode = "memory", cache_dir: Path | None = None
    ) -> None:
        self._store = _TensorStore(mode, cache_dir)
        self.encoder_id = encoder_id
        self.clip_skip = clip_skip

    def _description(self, caption: str) -> dict[str, object]:
        return {
            "format": CACHE_FORMAT,
            "kind": "text",
            "encoder": self.encoder_id,
            "clip_skip": self.clip_skip,
            "caption": caption,
        }

    def key(self, caption: str) -> str:
        return _digest(self._description(caption))

    def prepare(
        self,
        captions: Iterable[str],
        encode_text: Callable[[list[str]], dict[str, torch.Tensor]],
        *,
        batch_size: int = 32,
        progress: Progress | None = None,
    ) -> CacheStats:
        """Encode every caption not cached yet. `encode_text(captions)` returns tensors with batch dim first
        (e.g. {"hidden_states": (B, 77, D), "pooled": (B, D)}); it is called under torch.no_grad()."""
        unique = sorted(set(captions))
        todo = [c for c in unique if not self._store.has(self.key(c))]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            with torch.no_grad():
                outputs = encode_text(chunk)
            for name, tensor in outputs.items():
                if tensor.shape[0] != len(chunk):
                    raise ValueError(f"encode_text returned {name} with batch {tensor.shape[0]} for {len(chunk)}")
            for j, caption in enumerate(chunk):
                row = {name: tensor[j] for name, tensor in outputs.items()}
                self._store.save(self.key(caption), row, self._description(caption))
            if progress is not None:
                progress(min(start + batch_size, len(todo)), len(todo))
        return CacheStats(encoded=len(todo), reused=len(unique) - len(todo))

    def get(self, caption: str) -> dict[str, torch.Tensor]:
        """The cached outputs for `caption` (no batch dim); DataError if `prepare` did not cover it."""
        tensors = self._store.load(self.key(caption))
        if tensors is None:
            raise DataError(f"caption {caption!r} is not in the text-embedding cache (captions must be fixed)")
        return tensors
