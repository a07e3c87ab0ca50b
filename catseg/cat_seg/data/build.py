"""Datasets, samplers and data loaders (detectron2 conventions, plain ``torch.utils.data``).

- Test: batch size 1, records in order; under ``torch.distributed`` each rank gets a contiguous shard
  (``InferenceSampler``, as detectron2's). Batches are lists of mapper dicts.
- Train: an infinite ``TrainingSampler`` draws a fresh permutation per pass from a seed shared by all
  ranks; global draw ``p`` goes to rank ``p % world_size``, so ranks see different samples. Each draw
  carries its global position ``p`` and the sample's augmentation uses
  ``numpy.random.default_rng([seed, p])``: results do not depend on ``num_workers`` or worker
  scheduling, and resuming at draw ``start`` reproduces the same stream.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

logger = logging.getLogger(__name__)

Record = dict[str, Any]


def _dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def trivial_batch_collator(batch: list[Any]) -> list[Any]:
    """Keep a batch as the list of mapper dicts (the model receives a list, as in detectron2)."""
    return batch


class MappedDataset(Dataset):
    """Records + test mapper: item ``i`` is ``mapper(records[i])``."""

    def __init__(self, records: Sequence[Record], mapper: Callable[[Record], Record]) -> None:
        self.records = list(records)
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.mapper(self.records[index])


class AugmentedDataset(Dataset):
    """Records + train mapper; items are addressed by ``(index, draw)`` pairs from ``TrainingSampler``.

    Item ``(i, p)`` is ``mapper(records[i], numpy.random.default_rng([seed, p]))``.
    """

    def __init__(
        self,
        records: Sequence[Record],
        mapper: Callable[[Record, np.random.Generator], Record],
        *,
        seed: int,
    ) -> None:
        self.records = list(records)
        self.mapper = mapper
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> Record:
        index, draw = key
        return self.mapper(self.records[index], np.random.default_rng([self.seed, int(draw)]))


class InferenceSampler(Sampler[int]):
    """Contiguous shard of ``range(size)`` for one rank (detectron2's split: the first ``size % world``
    ranks get one extra item).

    Args:
        size: number of items.
        rank, world_size: this process's shard; defaults to the torch.distributed state (0, 1 if none).
    """

    def __init__(self, size: int, *, rank: int | None = None, world_size: int | None = None) -> None:
        default_rank, default_world = _dist_rank_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        base, extra = divmod(size, self.world_size)
        sizes = [base + int(r < extra) for r in range(self.world_size)]
        self.begin = sum(sizes[: self.rank])
        self.end = self.begin + sizes[self.rank]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin


class TrainingSampler(Sampler[tuple[int, int]]):
    """Infinite stream of ``(index, draw)``: shuffled passes over ``range(size)``, sharded by rank.

    Pass ``k`` is ``numpy.random.default_rng([seed, k]).permutation(size)`` (or ``range(size)`` without
    shuffling); global draw ``p`` is item ``p % size`` of pass ``p // size`` and belongs to rank
    ``p % world_size``.

    Args:
        size: number of records (> 0).
        seed: shared by all ranks.
        shuffle: permute each pass.
        rank, world_size: defaults to the torch.distributed state.
        start: first global draw (to resume a run).
    """

    def __init__(
        self,
        size: int,
        *,
        seed: int,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        start: int = 0,
    ) -> None:
        if size <= 0:
            raise ValueError(f"TrainingSampler needs a non-empty dataset, got size {size}")
        default_rank, default_world = _dist_rank_world()
        self.size = size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.start = start

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        first = self.start + (self.rank - self.start) % self.world_size  # first draw of this rank >= start
        epoch, order = -1, np.empty(0, dtype=np.int64)
        for draw in itertools.count(first, self.world_size):
            if draw // self.size != epoch:
                epoch = draw // self.size
                order = self._order(epoch)
            yield int(order[draw % self.size]), draw


def build_test_loader(
    records: Sequence[Record],
    mapper: Callable[[Record], Record],
    *,
    num_workers: int = 0,
    distributed_shard: bool = True,
) -> DataLoader:
    """Evaluation loader: batch size 1, sequential; a contiguous shard per rank under torch.distributed.

    Args:
        records: dataset records (``load_records``).
        mapper: e.g. ``SemSegTestMapper``.
        num_workers: DataLoader worker processes.
        distributed_shard: shard across ranks when torch.distributed is initialised (else every rank
            sees all records).
    Returns:
        a DataLoader yielding lists holding one mapper dict.
    """
    sampler = (
        InferenceSampler(len(records))
        if distributed_shard
        else InferenceSampler(len(records), rank=0, world_size=1)
    )
    return DataLoader(
        MappedDataset(records, mapper),
        batch_size=1,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=trivial_batch_collator,
    )


def build_train_loader(
    records: Sequence[Record],
    mapper: Callable[[Record, np.random.Generator], Record],
    *,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    start: int = 0,
) -> DataLoader:
    """Infinite, seeded, distributed-aware training loader.

    Args:
        records: dataset records.
        mapper: e.g. ``SemSegTrainMapper`` (called as ``mapper(record, rng)``).
        batch_size: images per batch **per process** (detectron2's ``IMS_PER_BATCH // world_size``).
        num_workers: DataLoader worker processes (results do not depend on it).
        seed: seed of the sampling order and of the augmentations.
        start: first global draw (resume: ``iteration * batch_size * world_size``).
    Returns:
        an endless DataLoader yielding lists of ``batch_size`` mapper dicts.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    sampler = TrainingSampler(len(records), seed=seed, start=start)
    return DataLoader(
        AugmentedDataset(records, mapper, seed=seed),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        collate_fn=trivial_batch_collator,
        persistent_workers=num_workers > 0,
    )
