"""Rank script: a NaN injected into rank 1's weights before a sync, under nonfinite='raise' or 'drop'."""

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from _common import Recorder, TinyModel, rank, trainer

import lightning_opt  # noqa: F401
from lightning_opt.strategies import LocalSGDStrategy, NonFiniteError

out, policy = Path(sys.argv[1]), sys.argv[2]


class Poison(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 6:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


model, rec = TinyModel(), Recorder()
result = {"error": None}
try:
    trainer(LocalSGDStrategy(period=4, nonfinite=policy, timeout=60), max_steps=12,
            callbacks=[Poison(), rec]).fit(model)
except NonFiniteError as err:
    result["error"] = str(err)
result["params"] = torch.stack(rec.params)
torch.save(result, out / f"rank{rank()}.pt")
