"""Exact-resume data order: epochs of a seeded permutation, and skipping the batches already seen.

The data position saved in a checkpoint is `{"epoch": e, "batch_in_epoch": b}` (counted in
micro-batches of this process). On resume:
- a map-style dataset (`__len__`/`__getitem__`) restarts its epoch-`e` permutation at sample
  `b * batch_size` through `SeededEpochSampler(start=...)`: nothing is decoded twice;
- an iterable dataset (a WebDataset pipeline) is replayed from the start of epoch `e` and the first
  `b` batches are discarded, which is exact when the pipeline is seeded (its shuffle buffer and
  augmentations depend only on the seed) at the cost of decoding those batches again.

Shared by Stage I and Stage II.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

__all__ = ["DataPosition", "SeededEpochSampler", "ResumableBatches"]


@dataclass
class DataPosition:
    """Where the next micro-batch comes from: epoch number and batches already taken in it."""

    epoch: int = 0
    batch_in_epoch: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    @classmethod
    def from_dict(cls, data: dict | None) -> "DataPosition":
        data = data or {}
        return cls(int(data.get("epoch", 0)), int(data.get("batch_in_epoch", 0)))


class SeededEpochSampler(Sampler[int]):
    """Indices of a permutation seeded by (seed, epoch), this rank's share, starting at `start`.

    Rank r of W takes positions r, r+W, ... of the permutation (padded by wrapping so every rank
    gets the same count, as DistributedSampler does).
    """

    def __init__(self, length: int, *, seed: int, epoch: int, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, start: int = 0):
        self.length, self.seed, self.epoch, self.shuffle = length, seed, epoch, shuffle
        self.rank, self.world_size, self.start = rank, world_size, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=gen).tolist()
        else:
            order = list(range(self.length))
        per_rank = -(-self.length // self.world_size)
        order = (order * (per_rank * self.world_size // max(self.length, 1) + 1))[: per_rank * self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return max(len(self._indices()) - self.start, 0)


class ResumableBatches:
    """Endless iterator of (DataPosition, batch) over epochs, starting at a saved position.

    `make_loader(epoch, start_sample)` must return an iterable of batches for that epoch; for a
    map-style dataset use `ResumableBatches.for_dataset`, which builds a DataLoader over a
    `SeededEpochSampler`. If the returned loader cannot start mid-epoch (`start_sample` ignored:
    iterable datasets), pass `seekable=False` and the batches are skipped by consuming them.
    `max_batches_per_epoch` ends an epoch early (None: when the loader is exhausted).
    """

    def __init__(self, make_loader: Callable[[int, int], Iterable], batch_size: int, *,
                 position: DataPosition | None = None, seekable: bool = True):
        self.make_loader, self.batch_size, self.seekable = make_loader, batch_size, seekable
        self.position = position or DataPosition()

    @classmethod
    def for_dataset(cls, dataset: Dataset, batch_size: int, *, seed: int, position: DataPosition | None = None,
                    collate_fn=None, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                    drop_last: bool = True, pin_memory: bool = False) -> "ResumableBatches":
        if isinstance(dataset, IterableDataset):
            def make_iterable(epoch: int, start_sample: int) -> Iterable:
                if hasattr(dataset, "set_epoch"):
                    dataset.set_epoch(epoch)
                return DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers,
                                  drop_last=drop_last, pin_memory=pin_memory)

            return cls(make_iterable, batch_size, position=position, seekable=False)

        def make_map(epoch: int, start_sample: int) -> Iterable:
            sampler = SeededEpochSampler(len(dataset), seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                                         start=start_sample)
            return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                              num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory)

        return cls(make_map, batch_size, position=position, seekable=True)

    def __iter__(self) -> Iterator[tuple[DataPosition, object]]:
        empty_epochs = 0
        while True:
            epoch, skip = self.position.epoch, self.position.batch_in_epoch
            loader = self.make_loader(epoch, skip * self.batch_size if self.seekable else 0)
            iterator = iter(loader)
            if not self.seekable:
                for _ in range(skip):
                    if next(iterator, None) is None:
                        break
            produced = 0
            for batch in iterator:
                produced += 1
                self.position = DataPosition(epoch, self.position.batch_in_epoch + 1)
                yield DataPosition(epoch, self.position.batch_in_epoch), batch
            empty_epochs = empty_epochs + 1 if produced == 0 else 0
            if empty_epochs >= 2:
                raise RuntimeError("the training data produced no batch in two consecutive epochs (dataset smaller than one batch?)")
            self.position = DataPosition(epoch + 1, 0)
