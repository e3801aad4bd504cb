"""Tiny model, data and recording callback shared by the distributed test scripts."""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_opt import _flavour

# The Lightning package of the default namespace ($LIGHTNING_OPT_PACKAGE), so one script runs under either.
pl = _flavour.lightning_module()


def make_data(n: int = 96, d: int = 6, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


class TinyModel(pl.LightningModule):
    """MLP with BatchNorm (a float buffer and an integer buffer) for regression; sharded without shuffling so
    runs can be compared step by step."""

    def __init__(self, lr: float = 0.05, opt: str = "sgd", batch_size: int = 8, n: int = 96, bn: bool = True,
                 momentum: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16) if bn else nn.Identity(), nn.Tanh(),
                                 nn.Linear(16, 1))
        self.lr, self.opt, self.batch_size, self.n, self.momentum = lr, opt, batch_size, n, momentum
        self.losses: list[float] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(float(loss))
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        if self.opt == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)

    def _loader(self) -> DataLoader:
        ds = make_data(self.n)
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()


class CaptureLogger(pl.loggers.Logger):
    """Records every ``log_metrics`` call as (step, metrics) on the rank it runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, {k: float(v) for k, v in metrics.items()}))

    def steps_with(self, key: str) -> list[int]:
        return [s for s, m in self.calls if key in m]

    def values(self, key: str) -> list[float]:
        return [m[key] for _, m in self.calls if key in m]


def first_layer_and_rest(model: TinyModel) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """TinyModel's parameters split in two (first layer / the rest), for modules with two optimizers."""
    first = list(model.net[0].parameters())
    return first, [p for p in model.parameters() if all(p is not q for q in first)]


class TwoOptimizers(TinyModel):
    """Manual optimisation: optimizer A (first layer) steps every batch, B (the rest) every other batch."""

    def __init__(self) -> None:
        super().__init__(bn=False)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        if batch_idx % 2 == 1:
            opt_b.step()

    def configure_optimizers(self):
        first, rest = first_layer_and_rest(self)
        return torch.optim.SGD(first, lr=self.lr), torch.optim.SGD(rest, lr=self.lr)


def flat_params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


def recording(cls):
    """Subclass of a periodic strategy that records the flat weights right before (``pre``) and after (``post``)
    every sync, and the optimizer index of each sync (``sync_ids``)."""

    class Recording(cls):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.pre, self.post, self.sync_ids = [], [], []

        def _sync(self, idx, step):
            self.sync_ids.append(idx)
            self.pre.append(flat_params(self.lightning_module))
            super()._sync(idx, step)
            self.post.append(flat_params(self.lightning_module))

    return Recording


class Recorder(pl.Callback):
    """Records the flat parameters and BN running mean after every optimizer step on this rank."""

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.bn: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params.append(flat_params(pl_module))
        bns = [m.running_mean.clone() for m in pl_module.modules() if isinstance(m, nn.BatchNorm1d)]
        self.bn.append(bns[0] if bns else torch.zeros(1))


# Read once: Lightning's teardown may drop WORLD_SIZE from the environment after a fit.
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", 2))


def trainer(strategy, max_steps: int = 12, callbacks=(), devices: int = WORLD_SIZE, **kw) -> pl.Trainer:
    """The test scripts' Trainer: quiet, unsharded, no validation, logging or checkpoints unless ``kw`` asks."""
    for key, value in {"logger": False, "enable_checkpointing": False, "num_sanity_val_steps": 0,
                       "limit_val_batches": 0}.items():
        kw.setdefault(key, value)
    return pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy,
                      max_steps=max_steps, callbacks=list(callbacks), use_distributed_sampler=False,
                      enable_progress_bar=False, enable_model_summary=False, **kw)


def rank() -> int:
    return int(os.environ.get("RANK", 0))
