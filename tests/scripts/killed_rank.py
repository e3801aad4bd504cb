"""Rank script: Local SGD with per-epoch checkpoints. mode=fault: rank 1 SIGKILLs itself mid-epoch 3;
mode=resume / resume1 (another world size): resume from argv[3]; mode=full: uninterrupted.
Writes the final parameters."""

import os
import signal
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from _common import TinyModel, rank, trainer
from pytorch_lightning.callbacks import ModelCheckpoint

import lightning_opt  # noqa: F401
from lightning_opt.strategies import LocalSGDStrategy

out, mode = Path(sys.argv[1]), sys.argv[2]


class Kill(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if mode == "fault" and trainer.global_rank == 1 and trainer.global_step == 15:
            os.kill(os.getpid(), signal.SIGKILL)


ckpt = ModelCheckpoint(dirpath=out / "ckpt", every_n_epochs=1, save_top_k=-1, filename="{epoch}")
model = TinyModel(opt="sgd", momentum=0.9)
t = trainer(LocalSGDStrategy(period=4, timeout=20), max_steps=-1, max_epochs=4, callbacks=[Kill(), ckpt],
            enable_checkpointing=True)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    t.fit(model, ckpt_path=sys.argv[3] if mode.startswith("resume") else None)
(out / f"{mode}_rank{rank()}.warnings").write_text("\n".join(str(w.message) for w in caught))
torch.save(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), out / f"{mode}_rank{rank()}.pt")
