"""The loaders shared by the example DataModules: a seeded train/val split and the optionally sharded train loader.

``shard=True`` (with ``Trainer(use_distributed_sampler=False)``) shards the train loader with a non-shuffling
``DistributedSampler`` built here instead of the shuffling one Lightning would inject, so step-by-step trajectory
comparisons under DDP-family strategies see the same batches in the same order.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def _seeded_split(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded random (train, val) index split of ``range(n)``."""
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


class _ShardMixin:
    """Builds the train loader, optionally sharded by a non-shuffling ``DistributedSampler`` made here."""

    trainer: pl.Trainer | None
    shard: bool
    seed: int
    batch_size: int
    num_workers: int

    def _world_and_rank(self) -> tuple[int, int]:
        # ``LightningDataModule.trainer`` is None until the Trainer attaches the datamodule.
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _loader(self, ds: Dataset, *, train: bool, shuffle: bool, sampler=None) -> DataLoader:
        kwargs: dict = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
        }
        if train and self.shard:
            world, rank = self._world_and_rank()
            # shuffle=False: the order is already a seeded permutation, and Lightning's injected sampler
            # would reshuffle with its own seed (breaking step-by-step comparisons between runs).
            kwargs["sampler"] = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
        elif sampler is not None:
            kwargs["sampler"] = sampler
        elif shuffle:
            # A seeded generator makes the per-epoch shuffle reproducible across runs.
            kwargs["shuffle"] = True
            kwargs["generator"] = torch.Generator().manual_seed(self.seed)
        return DataLoader(ds, **kwargs)
