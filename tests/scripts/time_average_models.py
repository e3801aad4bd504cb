"""Small LightningModules shared by the TimeAverageMonitor tests (thesis Fig. 6-5 and a BN/dropout MLP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


class SinModule(LightningModule):
    """Full-batch gradient descent on f(θ1, θ2) = 100·sin θ1·sin θ2 (thesis §6.3, Fig. 6-5).

    Every batch holds one number c; the loss is f(θ) + c·sin θ1. Single-process runs feed c = 0 (plain f);
    the DDP test feeds c = +5 on rank 0 and −5 on rank 1, so per-rank losses (and gains) differ while the
    rank-averaged objective, and hence the DDP trajectory, is exactly f.
    """

    def __init__(self, lr: float, theta0: tuple[float, float] = (1.0, -0.5), steps: int = 2000,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.lr = lr
        self.steps = steps
        self.theta = nn.Parameter(torch.tensor(theta0, dtype=dtype))

    def objective(self) -> torch.Tensor:
        return 100.0 * torch.sin(self.theta[0]) * torch.sin(self.theta[1])

    def training_step(self, batch, batch_idx):
        (c,) = batch
        loss = self.objective() + (c.to(self.theta.dtype) * torch.sin(self.theta[0])).mean()
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=1)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        self.log("grad/norm", self.theta.grad.norm(), on_step=True, on_epoch=False, batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(self.steps)), batch_size=1)


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
