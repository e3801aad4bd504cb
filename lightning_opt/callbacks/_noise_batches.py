"""Where GradientNoiseMonitor's M batches come from: a probe loader of independent batches, or micro-batches of the
training batch (see the monitor's docstring)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

__all__ = ["IndependentBatches", "batch_rows", "micro_batches", "probe_loader"]


def batch_rows(batch: Any) -> int | None:
    """Rows of the first tensor with a batch dimension in a (nested) batch."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        items = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        items = list(batch)
    else:
        return None
    for item in items:
        b = batch_rows(item)
        if b is not None:
            return b
    return None


def _slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Rows [start, stop) of every tensor in a (nested) batch; other leaves are passed through."""
    if isinstance(batch, Tensor):
        return batch[start:stop] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: _slice_batch(v, start, stop) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_slice_batch(v, start, stop) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice_batch(v, start, stop) for v in batch)
    return batch


def micro_batches(batch: Any, m: int) -> tuple[list[Any], int] | None:
    """``batch`` split into ``m`` micro-batches of ⌊b/m⌋ rows (the remainder dropped) and that size; None when a
    micro-batch would be empty."""
    b = batch_rows(batch)
    if b is None or b // m < 1:
        return None
    c = b // m
    return [_slice_batch(batch, i * c, (i + 1) * c) for i in range(m)], c


class IndependentBatches:
    """Batch sampler of ``num_batches`` independent batches: each is ``batch_size`` distinct indices drawn
    uniformly (``randperm(n)[:batch_size]``) from the probe generator. Batches are independent of each other,
    so the probe gradients are i.i.d. given θ; consecutive batches of one shuffled pass would instead be
    negatively correlated when M·b is a sizeable fraction of the dataset (finite-population effect), which
    biases σ downwards and the across-sample tail index upwards."""

    def __init__(self, n: int, batch_size: int, num_batches: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.num_batches, self.generator = n, batch_size, num_batches, generator

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.num_batches):
            yield torch.randperm(self.n, generator=self.generator)[: self.batch_size].tolist()


def probe_loader(loader: Any, batch_size: int | None, num_batches: int, generator: torch.Generator) -> DataLoader:
    """A loader of ``num_batches`` independent batches over ``loader``'s map-style dataset, with its
    ``collate_fn``, ``num_workers=0`` and ``generator`` (``batch_size`` None: the loader's)."""
    own = "GradientNoiseMonitor(source='probe')"
    if not isinstance(loader, DataLoader):
        raise RuntimeError(f"{own} needs a single torch DataLoader as training loader, got {type(loader).__name__}; "
                           "use source='micro'")
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        raise RuntimeError(f"{own} needs a map-style training dataset; use source='micro'")
    bs = batch_size or loader.batch_size
    if bs is None:
        raise RuntimeError(f"{own}: the training loader has no batch_size (batch_sampler?); pass one")
    n = len(dataset)  # type: ignore[arg-type]
    if n < bs:
        raise RuntimeError(f"{own}: the dataset of {n} samples is smaller than the batch size {bs}")
    sampler = IndependentBatches(n, bs, num_batches, generator)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=0, collate_fn=loader.collate_fn)
