"""One rank of the matrix-completion reproduction (started by ``matrix_completion.py`` through
:func:`lightning_opt.testing.run_ranks`; not meant to be run by hand).

argv: out_dir. Reads ``out_dir/plan.json`` (a list of runs: strategy, its arguments, problem instance, lr, steps,
entry-sampling rate), fits each run in turn in the same process group and writes the rank's exact objective
F(X_i) after every optimizer step (after any sync), F(0) and the final X_i to ``out_dir/<run id>_rank<r>.json``.

The module holds X ∈ R^{d×r} (float64). Each step it draws its own symmetric Bernoulli(q) mask S of observed entries
(a per-rank stream, identical across strategies) and minimises ¼‖S∘(M − XXᵀ)‖²_F / q, whose gradient
(S∘(XXᵀ − M))X / q is an unbiased estimate of ∇F(X) = (XXᵀ − M)X for F(X) = ¼‖M − XXᵀ‖²_F (LSGD paper, Suppl. §8).
Every worker starts from its own X_0 ~ N(0, 1) (as in the paper), set in ``on_fit_start`` after the strategy's
initial broadcast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_opt.strategies.easgd import EASGDStrategy
from lightning_opt.strategies.local_sgd import LocalSGDStrategy
from lightning_opt.strategies.lsgd import LSGDStrategy

STRATEGIES = {"lsgd": LSGDStrategy, "easgd": EASGDStrategy, "local_sgd": LocalSGDStrategy}


def problem(d: int, r: int, seed: int) -> torch.Tensor:
    """M = UUᵀ with U ~ N(0, 1)^{d×r} (paper Suppl. §8)."""
    g = torch.Generator().manual_seed(1000 + seed)
    u = torch.randn(d, r, generator=g, dtype=torch.float64)
    return u @ u.T


def objective(x: torch.Tensor, m: torch.Tensor) -> float:
    res = m - x @ x.T
    return float(0.25 * (res * res).sum())


class MatrixCompletion(pl.LightningModule):
    def __init__(self, d: int, r: int, seed: int, lr: float, q: float, steps: int) -> None:
        super().__init__()
        self.d, self.r, self.seed, self.lr, self.q, self.steps = d, r, seed, lr, q, steps
        self.register_buffer("m", problem(d, r, seed), persistent=False)
        self.x = nn.Parameter(torch.zeros(d, r, dtype=torch.float64))
        self.objectives: list[float] = []
        self.gen: torch.Generator | None = None
        self.last_x = self.x.detach().clone()

    def on_fit_start(self) -> None:
        rank = self.global_rank
        g = torch.Generator().manual_seed(10_000 * (self.seed + 1) + rank)
        with torch.no_grad():
            self.x.copy_(torch.randn(self.d, self.r, generator=g, dtype=torch.float64))
        self.gen = torch.Generator().manual_seed(20_000 * (self.seed + 1) + rank)
        self.objectives = [objective(self.x.detach(), self.m)]

    def training_step(self, batch, batch_idx):
        res = self.m - self.x @ self.x.T
        if self.q < 1.0:
            upper = torch.triu((torch.rand(self.d, self.d, generator=self.gen) < self.q).double())
            mask = upper + upper.T - torch.diag(torch.diag(upper))
            return 0.25 * (mask * res * res).sum() / self.q
        return 0.25 * (res * res).sum()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.objectives.append(objective(self.x.detach(), self.m))
        self.last_x = self.x.detach().clone()  # the local weights (fit hands back the consensus)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(self.steps)), batch_size=1)


def main() -> None:
    out = Path(sys.argv[1])
    plan = json.loads((out / "plan.json").read_text())
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ["WORLD_SIZE"])
    for run in plan:
        strategy = STRATEGIES[run["strategy"]](**run["kwargs"], timeout=120)
        model = MatrixCompletion(run["d"], run["r"], run["seed"], run["lr"], run["q"], run["steps"])
        trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=run["steps"],
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                             limit_val_batches=0)
        trainer.fit(model)
        f_zero = objective(torch.zeros_like(model.x), model.m)  # F(0) = ¼‖M‖²_F, the scale of the plot
        (out / f"{run['id']}_rank{rank}.json").write_text(json.dumps(
            {"objective": model.objectives, "f_zero": f_zero, "final_x": model.last_x.tolist()}))


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    main()
