"""Small LightningModule + data shared by the SharpnessMonitor tests and their DDP script."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from lightning_opt.stats.hvp import flat_to_tensors, flatten_tensors


class TinyNet(pl.LightningModule):
    """tanh MLP with BatchNorm and dropout (~250 parameters): small enough for an exact Hessian."""

    def __init__(self, lr: float = 0.05, dropout: float = 0.2) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(dropout),
                                 nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ShardedTinyNet(TinyNet):
    """TinyNet whose training data is split over the ranks (batch 16 per rank, unshuffled)."""

    def train_dataloader(self):
        base = loader(batch_size=16)
        sampler = DistributedSampler(base.dataset, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
        return DataLoader(base.dataset, batch_size=16, sampler=sampler)


def dataset(n: int = 128, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return TensorDataset(x, y)


def loader(batch_size: int = 32, **kw) -> DataLoader:
    return DataLoader(dataset(), batch_size=batch_size, shuffle=False, **kw)


def exact_hessian(model: TinyNet, batch) -> torch.Tensor:
    """Exact Hessian of the eval-mode (BN running stats, no dropout) loss on ``batch`` w.r.t. all parameters."""
    x, y = batch
    was = model.training
    model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    like = [p.detach() for p in model.parameters() if p.requires_grad]

    def f(flat):
        out = functional_call(model, dict(zip(names, flat_to_tensors(flat, like), strict=True)), (x,))
        return nn.functional.cross_entropy(out, y)

    h = torch.func.hessian(f)(flatten_tensors(like).double().float())
    model.train(was)
    return h.double()
