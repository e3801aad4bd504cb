"""The MLP both strategy benchmarks train: four ReLU layers (or, with ``blocks``, a deep narrow one of many small
tensors), SGD with momentum, data sharded over the ranks."""

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset


class BenchMLP(pl.LightningModule):
    """``in_dim → width → width → width → classes``, initialised from seed 0 so every rank and run starts alike;
    ``dataset()`` is built when the trainer asks for the loader."""

    def __init__(self, dataset: Callable[[], Dataset], in_dim: int, width: int, classes: int, batch_size: int,
                 world: int, blocks: int = 0) -> None:
        super().__init__()
        self.dataset, self.batch_size, self.world = dataset, batch_size, world
        torch.manual_seed(0)
        if blocks:  # many small tensors (Linear + LayerNorm per block): what per-parameter Python work costs
            self.net = nn.Sequential(nn.Linear(in_dim, width), *[nn.Sequential(
                nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()) for _ in range(blocks)],
                nn.Linear(width, classes))
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                     nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        ds = self.dataset()
        sampler = DistributedSampler(ds, self.world, self.global_rank, shuffle=True, seed=0)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler)


def argmax_data() -> TensorDataset:
    """The strategy and fault benchmarks' data: 4096 Gaussian inputs (seed 0), labelled by the argmax of their
    first 10 coordinates."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g)
    return TensorDataset(x, x[:, :10].argmax(1))
