"""2-process gloo run of TimeAverageMonitor(plateau="decay_lr") on thesis Fig. 6-5's f = 100 sin θ1 sin θ2.

Rank r sees the batch value c_r = +5 / −5, so its loss is f + c_r·sin θ1: per-rank gains differ, the DDP-averaged
gradient (hence the trajectory) is that of f. The monitor must average the gain over ranks and decay the lr on
every rank at the same step. Every rank writes ``<out>/rank<r>.pt``.

Usage: python time_average_ddp.py --out DIR [--steps N]
"""

from __future__ import annotations

import argparse
import logging
import warnings
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from time_average_models import SinModule
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_opt.callbacks.time_average import TimeAverageMonitor


class ShardedSin(SinModule):
    def train_dataloader(self) -> DataLoader:
        ds = TensorDataset(torch.tensor([5.0, -5.0] * self.steps))
        sampler = DistributedSampler(ds, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
                                     shuffle=False)
        return DataLoader(ds, batch_size=1, sampler=sampler)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    torch.set_num_threads(1)

    model = ShardedSin(lr=0.04, steps=args.steps)
    monitor = TimeAverageMonitor(gain_every=1, gain_window=40, gain_batches=8, plateau="decay_lr", patience=3,
                                 decay_factor=0.1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(timeout=timedelta(seconds=60)),
        max_steps=args.steps, callbacks=[monitor], use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10,
    )
    trainer.fit(model)
    rank = trainer.global_rank
    torch.save({
        "rank": rank,
        "lrs": [g["lr"] for g in trainer.optimizers[0].param_groups],
        "events": monitor.events,
        "gain_window": monitor._gain.window.values(),
        "gain": monitor.gain_statistics(),
        "theta": model.theta.detach().clone(),
        "objective": float(model.objective()),
        "time_avg": monitor.time_averages(),
        "logged": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }, args.out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
