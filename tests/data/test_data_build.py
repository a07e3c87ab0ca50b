"""Samplers and loaders: sharding, infinite seeded sampling, list-of-dicts batches, worker independence."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from cat_seg.data import (
    InferenceSampler,
    SemSegTestMapper,
    SemSegTrainMapper,
    TrainingSampler,
    build_test_loader,
    build_train_loader,
    load_records,
)


def test_inference_sampler_contiguous_shards() -> None:
    shards = [list(InferenceSampler(10, rank=r, world_size=3)) for r in range(3)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert list(InferenceSampler(5)) == [0, 1, 2, 3, 4]  # no torch.distributed: everything
    with pytest.raises(ValueError):
        InferenceSampler(3, rank=2, world_size=2)


def test_training_sampler_is_seeded_infinite_and_rank_disjoint() -> None:
    take = lambda s, n: list(itertools.islice(iter(s), n))  # noqa: E731
    a = take(TrainingSampler(5, seed=3), 12)
    assert a == take(TrainingSampler(5, seed=3), 12)
    assert [i for i, _ in a] != [i for i, _ in take(TrainingSampler(5, seed=4), 12)]
    assert [d for _, d in a] == list(range(12))
    assert sorted(i for i, _ in a[:5]) == list(range(5)) and sorted(i for i, _ in a[5:10]) == list(range(5))
    r0 = take(TrainingSampler(6, seed=1, rank=0, world_size=2), 3)
    r1 = take(TrainingSampler(6, seed=1, rank=1, world_size=2), 3)
    assert {i for i, _ in r0}.isdisjoint({i for i, _ in r1})  # one pass split between the ranks
    assert sorted([*r0, *r1], key=lambda x: x[1]) == take(TrainingSampler(6, seed=1), 6)
    resumed = take(TrainingSampler(5, seed=3, start=7), 5)
    assert resumed == a[7:12]


def test_test_loader_yields_lists_in_order(synthetic_root: Path) -> None:
    records = load_records("pc59_sem_seg_val", synthetic_root)
    loader = build_test_loader(records, SemSegTestMapper(min_size=32, max_size=64), num_workers=0)
    batches = list(loader)
    assert len(batches) == len(records)
    assert all(isinstance(b, list) and len(b) == 1 for b in batches)
    assert [b[0]["file_name"] for b in batches] == [r["file_name"] for r in records]


def _train_batches(records, num_workers: int) -> list[list[dict]]:
    mapper = SemSegTrainMapper(min_sizes=(48,), max_size=200, crop_size=(32, 32), size_divisibility=32)
    loader = build_train_loader(records, mapper, batch_size=2, num_workers=num_workers, seed=11)
    return list(itertools.islice(iter(loader), 3))


def test_train_loader_is_deterministic_across_workers(synthetic_root: Path) -> None:
    records = load_records("bdd_sem_seg_train", synthetic_root)
    serial = _train_batches(records, 0)
    assert len(serial) == 3 and all(len(b) == 2 for b in serial)
    assert serial[0][0]["image"].shape == (3, 32, 32) and serial[0][0]["sem_seg"].dtype == torch.int64
    parallel = _train_batches(records, 2)
    for bs, bp in zip(serial, parallel):
        for s, p in zip(bs, bp):
            assert s["file_name"] == p["file_name"]
            assert torch.equal(s["image"], p["image"]) and torch.equal(s["sem_seg"], p["sem_seg"])
    # Same record drawn twice gets different augmentations (different draw positions).
    flat = [x for b in serial for x in b]
    by_name: dict[str, list[torch.Tensor]] = {}
    for x in flat:
        by_name.setdefault(x["file_name"], []).append(x["image"])
    repeated = [v for v in by_name.values() if len(v) > 1]
    assert repeated and any(not torch.equal(v[0], v[1]) for v in repeated)
    assert np.isfinite(serial[0][0]["image"].float().numpy()).all()
