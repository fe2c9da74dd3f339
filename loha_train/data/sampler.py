"""The epoch plan: repeats, regularization interleave, same-bucket batches, seeded order, resume, shards."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from loha_train.data.buckets import Bucket
from loha_train.data.common import derive_rng
from loha_train.data.scan import ImageItem


class SampleRef(NamedTuple):
    """What the sampler hands the dataset: which item, and the (epoch, slot) that seed its randomness."""

    item: int  # index into the dataset's items
    epoch: int
    slot: int  # position in the epoch's (unshuffled) sample list; unique within an epoch


class BucketBatchSampler:
    """Batches of same-bucket samples, a pure function of (items, buckets, batch_size, seed, epoch).

    Each epoch holds every training item `repeats` times and, when there are regularization items, as
    many regularization samples as training samples (as kohya does). Unlike kohya, which always uses the
    same first reg images, the reg samples rotate: each bucket gets a fixed quota (its share of the reg
    pool, reg images weighted by their repeats) and fills it each epoch from a seeded endless shuffle of
    that bucket's reg pool, so every reg image is used over the epochs while the batch count stays fixed.

    Samples are shuffled within their bucket and chunked into batches of `batch_size` (a bucket's last
    batch may be smaller); the batch list is shuffled; all from seeds derived from (seed, epoch). With
    `num_replicas` > 1 every rank gets the same number of batches: first the largest batches are split
    in two until the count divides evenly (shards stay disjoint and cover every sample); only when that
    is impossible (all batches of size 1) are the first batches repeated at the end, like torch's
    DistributedSampler. Rank r takes batches r, r + R, r + 2R, ...

    Ranks may hold batches of different buckets (shapes) at the same step, on purpose: DDP averages gradients,
    not batches, and a global batch list that does not depend on R (whenever its length divides by R) is what
    makes R processes train what one process accumulating R micro-batches would, and lets a run resume exactly
    with another number of processes.

    Use as a DataLoader `batch_sampler`; `set_epoch(epoch, start_batch)` positions it, so a run resumed at
    (epoch, batch) sees exactly the batches an uninterrupted run would. `len()` is this rank's batches
    per epoch, the same for every epoch.
    """

    def __init__(
        self,
        items: Sequence[ImageItem],
        buckets: Sequence[Bucket],
        batch_size: int,
        seed: int,
        *,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if len(items) != len(buckets):
            raise ValueError(f"{len(items)} items but {len(buckets)} buckets")
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"bad sampler settings: batch_size={batch_size}, rank {rank} of {num_replicas}")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start_batch = 0
        self._train = [(i, buckets[i]) for i, item in enumerate(items) if not item.is_reg for _ in range(item.repeats)]
        self._reg_pools: dict[Bucket, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            if item.is_reg:
                self._reg_pools[buckets[i]].extend([i] * item.repeats)
        self._reg_quota = allocate_quota(len(self._train), {b: len(p) for b, p in self._reg_pools.items()})
        self._cache: tuple[int, list[list[SampleRef]]] | None = None
        self._length = len(self.global_batches(0)) // num_replicas

    @property
    def samples_per_epoch(self) -> int:
        """Training plus regularization samples in one epoch, over all ranks (before any padding)."""
        return len(self._train) + sum(self._reg_quota.values())

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate `epoch` next, starting at this rank's batch `start_batch` (0 <= start_batch <= len)."""
        if not 0 <= start_batch <= self._length:
            raise ValueError(f"start_batch {start_batch} is outside an epoch of {self._length} batches")
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[list[SampleRef]]:
        yield from self.epoch_batches(self.epoch)[self.start_batch :]

    def epoch_batches(self, epoch: int) -> list[list[SampleRef]]:
        """This rank's batches of `epoch`, in order."""
        return self.global_batches(epoch)[self.rank :: self.num_replicas]

    def global_batches(self, epoch: int) -> list[list[SampleRef]]:
        """All ranks' batches of `epoch` (a multiple of num_replicas), before sharding."""
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._build(epoch))
        return self._cache[1]

    def _build(self, epoch: int) -> list[list[SampleRef]]:
        per_bucket = self._epoch_samples(epoch)
        order = derive_rng(self.seed, "order", epoch)
        batches: list[list[SampleRef]] = []
        for bucket in sorted(per_bucket):
            samples = per_bucket[bucket]
            if self.shuffle:
                samples = [samples[k] for k in order.permutation(len(samples))]
            batches.extend(samples[k : k + self.batch_size] for k in range(0, len(samples), self.batch_size))
        _split_until_divisible(batches, self.num_replicas)
        if self.shuffle:
            batches = [batches[k] for k in order.permutation(len(batches))]
        padding = -len(batches) % self.num_replicas
        return batches + [batches[k % len(batches)] for k in range(padding)]

    def _epoch_samples(self, epoch: int) -> dict[Bucket, list[SampleRef]]:
        per_bucket: dict[Bucket, list[SampleRef]] = defaultdict(list)
        for slot, (item, bucket) in enumerate(self._train):
            per_bucket[bucket].append(SampleRef(item, epoch, slot))
        slot = len(self._train)
        for bucket in sorted(self._reg_quota):
            for item in self._reg_draw(bucket, epoch):
                per_bucket[bucket].append(SampleRef(item, epoch, slot))
                slot += 1
        return per_bucket

    def _reg_draw(self, bucket: Bucket, epoch: int) -> list[int]:
        """This epoch's window of an endless stream of seeded shuffles of the bucket's reg pool."""
        pool, quota = self._reg_pools[bucket], self._reg_quota[bucket]
        permutations: dict[int, list[int]] = {}
        drawn = []
        for position in range(epoch * quota, (epoch + 1) * quota):
            cycle, offset = divmod(position, len(pool))
            if cycle not in permutations:
                rng = derive_rng(self.seed, "reg", bucket[0], bucket[1], cycle)
                permutations[cycle] = rng.permutation(len(pool)).tolist() if self.shuffle else list(range(len(pool)))
            drawn.append(pool[permutations[cycle][offset]])
        return drawn


def allocate_quota(total: int, weights: dict[Bucket, int]) -> dict[Bucket, int]:
    """Split `total` over buckets in proportion to `weights` (largest remainder, ties by bucket)."""
    weight_sum = sum(weights.values())
    if not weight_sum:
        return {}
    exact = {b: total * w / weight_sum for b, w in weights.items()}
    quota = {b: int(x) for b, x in exact.items()}
    by_remainder = sorted(weights, key=lambda b: (-(exact[b] - quota[b]), b))
    for bucket in by_remainder[: total - sum(quota.values())]:
        quota[bucket] += 1
    return {b: q for b, q in quota.items() if q}


def _split_until_divisible(batches: list[list[SampleRef]], parts: int) -> None:
    """Split the largest batches in two (in place) until len(batches) is a multiple of `parts`."""
    while len(batches) % parts:
        largest = max(range(len(batches)), key=lambda k: len(batches[k]))
        batch = batches[largest]
        if len(batch) < 2:
            return
        half = (len(batch) + 1) // 2
        batches[largest : largest + 1] = [batch[:half], batch[half:]]
