"""Tiny model and data shared by the monitor tests, scripts and benchmark (importable, no side effects).

An MLP with BatchNorm and Dropout (so probes must restore buffers and RNG) and a torchmetrics accumulator
updated in ``training_step`` (so probes must leave it alone), trained on a fixed random classification
problem.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_dataset(n: int = 512, dim: int = 16, classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, classes, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, classes, generator=g)).argmax(1)
    return TensorDataset(x, y)


class TinyMLP(pl.LightningModule):
    def __init__(self, dim: int = 16, hidden: int = 32, classes: int = 4, lr: float = 0.1,
                 batch_size: int = 32, n: int = 512, dropout: float = 0.1, dict_output: bool = False,
                 optimizer_cls: type[torch.optim.Optimizer] = torch.optim.SGD) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes),
        )
        self.lr = lr
        self.batch_size = batch_size
        self.n = n
        self.dict_output = dict_output
        self.optimizer_cls = optimizer_cls
        self.train_loss_mean = torchmetrics.MeanMetric()
        self.probe_safe_counter = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.train_loss_mean.update(loss.detach())
        self.log("train_loss", loss)
        return {"loss": loss} if self.dict_output else loss

    def configure_optimizers(self):
        return self.optimizer_cls(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(make_dataset(self.n), batch_size=self.batch_size, shuffle=True)


class StatsSGD(torch.optim.SGD):
    """SGD that publishes ``last_stats`` after each step, like the clipping optimizers of
    lightning_opt.optim."""

    def step(self, closure=None):
        loss = super().step(closure)
        with torch.no_grad():
            norms = [p.grad.norm() for g in self.param_groups for p in g["params"] if p.grad is not None]
            total = torch.linalg.vector_norm(torch.stack(norms))
        self.last_stats = {"post_clip_norm": total, "clip_fraction": torch.tensor(0.25)}
        return loss
