"""Two-process gloo run of GradNormMonitor + GradientNoiseMonitor (launched by tests/test_grad_monitors.py).

Three fits, each rank writing ``rank{r}.pt`` into ``--out``:
1. plain DDP without monitors → parameters;
2. the same with both monitors (probe source, TensorBoard logger in ``--out/tb``) → parameters (must match 1);
3. a short run where a helper callback scales each rank's gradients by (rank + 1) on logging steps only, so
the
   ranks' gradients differ as under the periodic-sync strategies → GradNormMonitor's mean / max over ranks.
"""

from __future__ import annotations

import argparse
import os
import warnings
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch
from monitors_model import StatsSGD, TinyMLP, make_dataset
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import DataLoader, DistributedSampler

from lightning_opt.callbacks.grad_norm import GradNormMonitor
from lightning_opt.callbacks.gradient_noise import GradientNoiseMonitor

warnings.filterwarnings("ignore")


class ShardedMLP(TinyMLP):
    """Deterministic sharding (see DESIGN.md: Lightning's injected sampler shuffles)."""

    def train_dataloader(self):
        ds = make_dataset(self.n)
        sampler = DistributedSampler(ds, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler)


class ScaleGradsByRank(Callback):
    """Multiply this rank's gradients by (rank + 1) on steps that GradNormMonitor logs (runs before it)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.true_norms: list[float] = []

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step % self.every == 0:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.true_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            for g in grads:
                g.mul_(trainer.global_rank + 1)


def fit(out: Path, callbacks: list, logger, max_steps: int, seed: int = 0) -> tuple[pl.Trainer, TinyMLP]:
    pl.seed_everything(seed, verbose=False)
    model = ShardedMLP(optimizer_cls=StatsSGD, batch_size=16, n=256)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(timeout=timedelta(seconds=60)),
        max_steps=max_steps, logger=logger, callbacks=callbacks, use_distributed_sampler=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=str(out),
    )
    trainer.fit(model)
    return trainer, model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    out: Path = args.out
    steps = 12

    _, m_plain = fit(out, [], False, steps)
    tb = TensorBoardLogger(str(out), name="tb", version=0)
    noise = GradientNoiseMonitor(every_n_steps=5, num_batches=8, max_coords=512, bootstrap=50)
    gnm = GradNormMonitor(every_n_steps=4, per_layer=True)
    t_mon, m_mon = fit(out, [gnm, noise], tb, steps)
    scaler = ScaleGradsByRank(every=2)
    t_scaled, _ = fit(out, [scaler, GradNormMonitor(every_n_steps=2)], False, 5)

    rank = t_mon.global_rank
    torch.save(
        {
            "plain": {k: v.detach().clone() for k, v in m_plain.state_dict().items()},
            "monitored": {k: v.detach().clone() for k, v in m_mon.state_dict().items()},
            "metrics": {k: float(v) for k, v in t_mon.callback_metrics.items()},
            "scaled_true_norms": scaler.true_norms,
            "scaled_metrics": {k: float(v) for k, v in t_scaled.callback_metrics.items()},
            "tb_dir": tb.log_dir,
            "world": t_mon.world_size,
            "pid": os.getpid(),
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
