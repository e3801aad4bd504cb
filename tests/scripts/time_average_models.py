"""Small LightningModules shared by the TimeAverageMonitor tests (thesis Fig. 6-5 and a BN/dropout MLP).

``SinModule`` (thesis Fig. 6-5's landscape) is the one ``examples/reproductions/time_average_sin.py`` runs; it lives in
``lightning_opt.examples.sin`` and is re-exported here for the test scripts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_opt.examples.sin import SinModule

__all__ = ["RandomMLP", "SinModule", "quiet_trainer_kwargs"]


class RandomMLP(LightningModule):
    """A small classifier with BatchNorm and dropout on a fixed random data set (shuffled loader)."""

    def __init__(self, lr: float = 0.05, n: int = 256, batch_size: int = 32, optimizer: str = "sgd") -> None:
        super().__init__()
        self.lr, self.batch_size, self.opt_name = lr, batch_size, optimizer
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, 0] + 0.5 * self.x[:, 1] > 0).long()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3),
                                 nn.Linear(32, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x + 0.01 * torch.randn_like(x)), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=x.shape[0])
        return loss

    def configure_optimizers(self):
        if self.opt_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        ds: Dataset = TensorDataset(self.x, self.y)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=True, drop_last=True)


def quiet_trainer_kwargs() -> dict:
    return dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
