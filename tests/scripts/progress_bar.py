"""Rank script: ProgressBarMetrics shows steps to the next sync and the GradNormMonitor's norm."""

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from _common import TinyModel, rank, trainer

import lightning_opt  # noqa: F401
from lightning_opt.callbacks import GradNormMonitor, ProgressBarMetrics
from lightning_opt.strategies import LocalSGDStrategy


class Snapshot(pl.Callback):
    def __init__(self):
        self.bars = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.bars.append(dict(trainer.progress_bar_metrics))


snap = Snapshot()
trainer(LocalSGDStrategy(period=3, warmup_steps=2, timeout=60), max_steps=8,
        callbacks=[GradNormMonitor(every_n_steps=1), ProgressBarMetrics(), snap]).fit(TinyModel(bn=False))
torch.save(snap.bars, Path(sys.argv[1]) / f"rank{rank()}.pt")
