"""Launched once: `local_sgd_spawn` spawns both ranks itself (start_method="spawn")."""

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from _common import TinyModel

import lightning_opt  # noqa: F401


class Save(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])
        torch.save({"params": flat, "syncs": trainer.strategy.meter.syncs, "world": trainer.world_size},
                   Path(sys.argv[1]) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="local_sgd_spawn", max_steps=6, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, callbacks=[Save()])
    trainer.strategy.schedule.period = 3
    trainer.fit(TinyModel())
