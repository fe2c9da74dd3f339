"""`data.streaming`: batches from a 🤗 `IterableDataset` that is never materialised, resumable exactly.

The stream (this process's part: `split_dataset_by_node`) is read in order. Each row is bucketed (from its
width/height columns, else its image header) into a bounded buffer; a bucket that holds `batch_size` samples is
emitted as a batch, and when `data.stream_buffer` samples wait without any full bucket the fullest one is
emitted short. At the end of the stream the rest is emitted bucket by bucket and the next epoch starts over.

Exact resume: for every buffered row the dataset's own `state_dict()` from just before it was read is kept.
`state_dict()` here is the oldest buffered row's dataset state, the rows read since and which of them are still
buffered; `load_state_dict()` rewinds the dataset there, re-reads those rows, keeps the buffered ones, and the
stream continues with exactly the batches an uninterrupted run would have read. Captions and crops are seeded
by (seed, epoch, slot) as for map-style data, with slot = row position x processes + rank.
"""

from __future__ import annotations

import copy
import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loha_train.config import DataConfig
from loha_train.data.buckets import Bucket, assign_bucket, bucket_resolutions, load_pixels, plan_crop, randomize_plan
from loha_train.data.caption_files import caption_policy, with_trigger
from loha_train.data.captions import caption_rng, process_caption
from loha_train.data.check import read_image_size
from loha_train.data.common import DataError, derive_rng
from loha_train.data.dataset import collate
from loha_train.data.sources.rows import TableSpec, image_bytes
from loha_train.data.sources.tables import CAPTION_NAMES, IMAGE_NAMES, _caption_text, _size

EPOCH_BATCHES = 10**12  # what len() reports: a stream's length is unknown, so the trainer never ends an epoch


@dataclass
class _Row:
    position: int  # index of the row in this process's stream, this epoch
    before: dict[str, Any]  # the dataset's state_dict() just before the row was read
    data: bytes
    caption: str
    size: tuple[int, int]
    bucket: Bucket


def open_stream(spec: TableSpec, rank: int, world: int) -> Any:
    """The table as an IterableDataset, this process's part of it (whole shards when they divide evenly)."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    datasets.disable_progress_bars()
    if spec.format == "saved":
        table = datasets.load_from_disk(spec.files[0])
        if isinstance(table, datasets.DatasetDict):
            table = table[spec.split]
        stream = table.to_iterable_dataset(num_shards=max(1, min(len(table), 64)))
    elif spec.format == "arrow":
        stream = datasets.load_dataset("arrow", data_files=list(spec.files), split="train", streaming=True)
    else:
        stream = datasets.load_dataset(spec.format, data_files=list(spec.files), split="train", streaming=True)
    if stream.features is not None:
        for name, feature in stream.features.items():
            if type(feature).__name__ == "Image":
                stream = stream.cast_column(name, datasets.Image(decode=False))
    return split_dataset_by_node(stream, rank=rank, world_size=world) if world > 1 else stream


class StreamBatches:
    """Collated training batches, epoch after epoch, from a stream; `state_dict`/`load_state_dict` resume exactly.

    Iterating continues from the current position (it never restarts the run's data); the trainer reads one batch
    per micro-step, so the state taken between steps is the state after the last batch it consumed.
    """

    def __init__(self, spec: TableSpec, cfg: DataConfig, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.spec, self.cfg, self.batch_size, self.seed = spec, cfg, batch_size, seed
        self.rank, self.world = rank, world
        self.stream = open_stream(spec, rank, world)
        self._start = self.stream.state_dict()  # an epoch starts here (after load_state_dict iter() would not)
        self.policy = caption_policy(cfg, is_reg=False)
        self.buckets = bucket_resolutions(cfg) if cfg.bucketing else ()
        self.epoch, self.read = 0, 0
        self.buffer: list[_Row] = []
        self._rows: Iterator[dict[str, Any]] | None = None
        self._loaded: dict[str, Any] | None = None  # the state loaded into the stream, until its first row is read
        self._columns: tuple[str, str | None, str | None, str | None] | None = None

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands, as JSON-able data (for the checkpoint)."""
        anchor = self.buffer[0] if self.buffer else None
        return {
            "epoch": self.epoch,
            "read": self.read,
            "anchor": copy.deepcopy(anchor.before if anchor else self.stream.state_dict()),
            "anchor_position": anchor.position if anchor else self.read,
            "buffered": [row.position for row in self.buffer],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rewind to `state`: reload the dataset's state, re-read the buffered rows, skip the emitted ones."""
        self.epoch, self.read, self.buffer = state["epoch"], state["anchor_position"], []
        self.stream.load_state_dict(copy.deepcopy(state["anchor"]))
        self._rows, self._loaded = iter(self.stream), copy.deepcopy(state["anchor"])
        buffered = set(state["buffered"])
        while self.read < state["read"]:
            row = self._next_row()
            if row is None:
                raise DataError(f"{self.spec.location}: the stream ended before the checkpoint's position; it changed")
            if row.position in buffered:
                self.buffer.append(row)

    # ------------------------------------------------------------------------------------------- batches
    def __len__(self) -> int:
        return EPOCH_BATCHES

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The trainer's sampler call; a stream keeps its own epoch and position (state_dict)."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> dict[str, Any]:
        """The next batch: the first full bucket, else (buffer full) the fullest bucket, else at the end of the
        stream what is left, bucket by bucket; then the next epoch."""
        if self._rows is None:
            self._rows = iter(self.stream)
        while True:
            full = self._full_bucket()
            if full is not None:
                return self._emit(full)
            row = self._next_row()
            if row is not None:
                self.buffer.append(row)
                continue
            if self.buffer:
                return self._emit(min(row.bucket for row in self.buffer))
            if self.read == 0:
                raise DataError(f"data.path: the stream {self.spec.location} has no rows for process {self.rank}")
            self.epoch, self.read = self.epoch + 1, 0
            self.stream.load_state_dict(copy.deepcopy(self._start))
            self._rows, self._loaded = iter(self.stream), copy.deepcopy(self._start)

    def _full_bucket(self) -> Bucket | None:
        counts: dict[Bucket, int] = {}
        for row in self.buffer:
            counts[row.bucket] = counts.get(row.bucket, 0) + 1
            if counts[row.bucket] >= self.batch_size:
                return row.bucket
        if len(self.buffer) >= self.cfg.stream_buffer:
            return max(sorted(counts), key=lambda b: counts[b])
        return None

    def _emit(self, bucket: Bucket) -> dict[str, Any]:
        chosen = [row for row in self.buffer if row.bucket == bucket][: self.batch_size]
        self.buffer = [row for row in self.buffer if not any(row is c for c in chosen)]
        return collate([self._sample(row) for row in chosen])

    def _sample(self, row: _Row) -> dict[str, Any]:
        slot = row.position * self.world + self.rank
        caption = process_caption(row.caption, self.cfg, caption_rng(self.seed, self.epoch, slot))
        plan = plan_crop(row.size, row.bucket)
        if self.cfg.random_crop or self.cfg.flip:
            rng = derive_rng(self.seed, "crop", self.epoch, slot)
            plan = randomize_plan(plan, self.cfg.random_crop, self.cfg.flip, rng)
        where = f"{self.spec.location} row {row.position} of process {self.rank}"
        pixels: torch.Tensor = load_pixels(io.BytesIO(row.data), plan, where)
        return {
            "key": f"stream/{self.rank}/{self.epoch}/{row.position}",
            "caption": caption,
            "is_reg": False,
            "loss_weight": 1.0,
            "original_size": (plan.original[1], plan.original[0]),
            "crop_top_left": plan.crop_top_left,
            "target_size": (plan.target[1], plan.target[0]),
            "pixels": pixels,
        }

    def _next_row(self) -> _Row | None:
        assert self._rows is not None
        # the dataset sets its state when iteration starts: before the first row after load_state_dict its
        # state_dict() is still the old one, so that row's state is the one just loaded
        before = self._loaded if self._loaded is not None else self.stream.state_dict()
        self._loaded = None
        record = next(self._rows, None)
        if record is None:
            return None
        image, caption_column, width, height = self._pick_columns(record)
        where = f"{self.spec.location} row {self.read} of process {self.rank}"
        data = image_bytes(record[image], self.spec.base, where)
        size = _size(record[width], record[height]) if width and height else None
        size = size or read_image_size(io.BytesIO(data))
        bucket = assign_bucket(size, self.cfg, self.buckets)
        if bucket is None:
            raise DataError(f"{where}: {size[0]}x{size[1]} is too small for any bucket")
        text = _caption_text(record.get(caption_column)) if caption_column else None
        caption = with_trigger(text if text is not None else self.cfg.default_caption or "", self.policy)
        row = _Row(self.read, before, data, caption, size, bucket)
        self.read += 1
        return row

    def _pick_columns(self, record: dict[str, Any]) -> tuple[str, str | None, str | None, str | None]:
        if self._columns is None:
            names = list(record)
            lowered = {n.lower(): n for n in names}
            image = self.cfg.image_column or next((lowered[n] for n in IMAGE_NAMES if n in lowered), None)
            caption = self.cfg.caption_column or next((lowered[n] for n in CAPTION_NAMES if n in lowered), None)
            if image is None or image not in record:
                raise DataError(
                    f"data.path: cannot tell which column of {self.spec.location} holds the images (columns: "
                    f"{', '.join(names)}); set data.image_column"
                )
            width = self.cfg.width_column or ("width" if "width" in record else None)
            height = self.cfg.height_column or ("height" if "height" in record else None)
            self._columns = (image, caption, width, height)
        return self._columns


def stream_fingerprint(spec: TableSpec) -> str:
    """What a resumed streaming run must find unchanged: the data files' names, sizes and modification times (the
    stream is never read up front)."""
    digest = hashlib.sha256()
    for name in spec.files:
        for path in sorted(Path(name).rglob("*")) if Path(name).is_dir() else [Path(name)]:
            if path.is_file():
                stat = path.stat()
                digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
