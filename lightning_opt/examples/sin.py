"""The two-parameter landscape of thesis §6.3 / Fig. 6-5, f(θ1, θ2) = 100·sin θ1·sin θ2, as a LightningModule.

f is L_f = 100 smooth, so gradient descent converges for η < 2/L_f = 0.02 and oscillates above it (η = 0.04 ends on
a cycle). Shared by ``examples/reproductions/time_average_sin.py`` and the ``TimeAverageMonitor`` tests.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["SinModule", "sin_objective"]


def sin_objective(theta: Tensor) -> Tensor:
    """f(θ) = 100·sin θ1·sin θ2 over the last dimension of ``theta`` (``[..., 2]``)."""
    return 100.0 * torch.sin(theta[..., 0]) * torch.sin(theta[..., 1])


class SinModule(pl.LightningModule):
    """Full-batch gradient descent on f(θ1, θ2) = 100·sin θ1·sin θ2 (thesis §6.3, Fig. 6-5).

    Every batch holds one number c; the loss is f(θ) + c·sin θ1. The default loader feeds c = 0 (plain f); a
    distributed test can feed c = +5 on rank 0 and −5 on rank 1, so per-rank losses (and gains) differ while the
    rank-averaged objective, and hence the DDP trajectory, is exactly f. Logs ``train/loss`` and ``grad/norm``.
    """

    def __init__(self, lr: float, theta0: tuple[float, float] = (1.0, -0.5), steps: int = 2000,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.lr = lr
        self.steps = steps
        self.theta = nn.Parameter(torch.tensor(theta0, dtype=dtype))

    def objective(self) -> Tensor:
        return sin_objective(self.theta)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        (c,) = batch
        loss = self.objective() + (c.to(self.theta.dtype) * torch.sin(self.theta[0])).mean()
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=1)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.log("grad/norm", self.theta.grad.norm(), on_step=True, on_epoch=False, batch_size=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(self.steps)), batch_size=1)
