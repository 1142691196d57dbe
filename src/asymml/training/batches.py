"""Batches of a dataset for training and evaluation.

* :class:`Batches`: shuffled fixed-size batches; the order of epoch ``e`` is a permutation drawn from a
  generator seeded with ``(seed, e)``, so a run resumed after any step sees the same batches.
* :class:`PoissonBatches`: for accounted (DP) runs, each sample joins each step's batch independently with
  probability ``q`` (the sampling the accountant's amplification assumes), drawn from the trusted secure
  generator so that the accelerator cannot predict batch membership.  Batches may be empty.

Data parallel (``rank`` of ``world`` trusted contexts): ``batch_size`` is per rank, the global batch is
``world * batch_size``.  Fixed batches: global batch ``i`` is the slice ``i`` of the epoch's one seeded
permutation (the same on every rank) and rank ``r`` takes its ``r``-th contiguous part, so the union of the
ranks' batches is exactly the single-process batch of ``world * batch_size`` (DistributedSampler's rule of
one shared seeded shuffle split between the ranks, per step, which also lets a run resume mid-epoch).
Poisson batches: rank ``r`` owns the samples ``r, r + world, ...`` and includes each with probability
``q = world * batch_size / n`` from its own secure generator; inclusions are independent per sample, so the
union is a Poisson sample of the whole set at rate ``q`` -- the rate the accountant composes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["Batches", "PoissonBatches", "mix_seed"]

_SEED_MOD = 2**63


def mix_seed(seed: int, *parts: int) -> int:
    """``seed * 1000003 + parts...`` folded into a valid 63-bit generator seed."""
    out = seed
    for p in parts:
        out = out * 1_000_003 + p
    return out % _SEED_MOD


class Batches:
    """Batches of a dataset: in-memory tensors are indexed directly, other datasets go through a DataLoader.

    The training order of epoch ``e`` is a permutation drawn from a generator seeded with ``(seed, e)``;
    the last partial batch is dropped (unless the set is smaller than one batch).
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, workers: int = 0, limit: int | None = None,
                 seed: int = 0, rank: int = 0, world: int = 1) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        if limit is not None and limit < n:
            gen = torch.Generator().manual_seed((seed + 7919) % _SEED_MOD)
            keep = torch.randperm(n, generator=gen)[:limit].sort().values
            dataset = self._subset(dataset, keep)
            n = limit
        self.dataset = dataset
        self.n = n
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.workers = workers
        tensors = getattr(dataset, "tensors", None)
        self.tensors = tensors if isinstance(tensors, tuple) and len(tensors) == 2 else None

    @staticmethod
    def _subset(dataset: Dataset, keep: torch.Tensor) -> Dataset:
        tensors = getattr(dataset, "tensors", None)
        if isinstance(tensors, tuple) and len(tensors) == 2:
            from ..data import ImageTensorDataset

            return ImageTensorDataset(tensors[0][keep], tensors[1][keep])
        return Subset(dataset, keep.tolist())

    @property
    def global_batch_size(self) -> int:
        """The batch of one step over all ranks."""
        return self.batch_size * self.world

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.n // self.global_batch_size)

    def _empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        x0, y0 = self.dataset[0]
        x0, y0 = torch.as_tensor(x0), torch.as_tensor(y0)
        return x0.new_empty((0, *x0.shape)), y0.new_empty((0, *y0.shape))

    def _iterate(self, index_batches: list[torch.Tensor], loader_seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.tensors is not None:
            x, y = self.tensors
            for idx in index_batches:
                yield x[idx], y[idx]
            return
        if any(len(b) == 0 for b in index_batches):  # Poisson batches may be empty: one batch at a time
            for b in index_batches:
                yield from (self._iterate([b], loader_seed) if len(b) else [self._empty()])
            return
        loader = DataLoader(self.dataset, batch_sampler=[b.tolist() for b in index_batches],
                            num_workers=self.workers, generator=torch.Generator().manual_seed(loader_seed))
        yield from loader

    def train(self, seed: int, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start, start+1, ...`` of training epoch ``epoch``."""
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
        bs = min(self.global_batch_size, self.n)
        batches = [perm[i * bs:(i + 1) * bs] for i in range(start, self.steps_per_epoch)]
        if self.world > 1:
            part = bs // self.world
            batches = [b[self.rank * part:(self.rank + 1) * part] for b in batches]
        return self._iterate(batches, mix_seed(seed, epoch * 10_007 + start))

    def ordered(self, rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All samples in order (evaluation); with ``world > 1``, rank ``rank``'s share: batches
        ``rank, rank + world, ...``."""
        idx = torch.arange(self.n)
        batches = [idx[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        return self._iterate(batches[rank::world], 0)


class PoissonBatches:
    """Poisson-sampled training batches over ``base``'s samples: ``steps_per_epoch = round(n / B)`` steps per
    epoch, each sample in each batch with probability ``sample_rate = B / n`` (``B``: the global batch size).

    ``generator`` provides ``uniform(n, label=..., index=...)`` (the trusted secure generator); step ``t``
    of the run uses the draw addressed ``("poisson", t)``.  With ``base.world > 1`` this rank draws for its
    own samples ``rank, rank + world, ...`` only (see the module's docstring).
    """

    def __init__(self, base: Batches, generator: Any) -> None:
        self.base = base
        self.n = base.n
        self.generator = generator
        self.steps_per_epoch = max(1, round(base.n / base.global_batch_size))
        self.sample_rate = min(1.0, base.global_batch_size / base.n)
        self.shard = torch.arange(base.rank, base.n, base.world)

    @property
    def expected_batch_size(self) -> float:
        """``q * n``: the expected global batch (what DP-SGD divides the noised sum by)."""
        return self.sample_rate * self.n

    def indices(self, global_step: int) -> torch.Tensor:
        """The sorted sample indices of the batch of run step ``global_step``."""
        u = self.generator.uniform(len(self.shard), label="poisson-batch", index=global_step)
        return self.shard[(u < self.sample_rate).nonzero().flatten()]

    def train(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start, start+1, ...`` of training epoch ``epoch``."""
        for s in range(start, self.steps_per_epoch):
            yield from self.base._iterate([self.indices(epoch * self.steps_per_epoch + s)], 0)
