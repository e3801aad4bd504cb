"""Rank script: LSGD's eval_weights (center / leader / local) decide fit's final weights, also when the last step is
a sync (pulled workers stay apart); sync metrics are logged."""

import sys
from pathlib import Path

import torch
from _common import Recorder, TinyModel, flat_params, rank, trainer
from pytorch_lightning.loggers import TensorBoardLogger

import lightning_opt  # noqa: F401
from lightning_opt.strategies import LSGDStrategy

out = Path(sys.argv[1])
offsets = [1.0, 0.0]


class OffsetModel(TinyModel):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + offsets[self.global_rank]


results = {}
for mode in ("center", "leader", "local"):
    rec, model = Recorder(), OffsetModel(bn=False)
    logger = TensorBoardLogger(out / "tb", name=mode) if mode == "center" else False
    trainer(LSGDStrategy(period=4, pull=0.5, leader_window=2, eval_weights=mode, timeout=60), max_steps=8,
            callbacks=[rec], logger=logger, log_every_n_steps=1).fit(model)
    results[mode] = {"local": rec.params[-1], "final": flat_params(model)}
torch.save(results, out / f"rank{rank()}.pt")
