"""Rank script for EASGDStrategy: records every rank's parameters (and the centre) right before and after each sync,
the initial weights, a mid-period checkpoint and the weights ``fit`` hands back.

argv: out_dir beta period max_steps ckpt_step [poison_rank]
With ``poison_rank`` the strategy uses ``nonfinite="drop"`` and that rank gets a NaN weight after step 4.
"""

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from _common import TinyModel, flat_params, rank
from torch import nn

import lightning_opt  # noqa: F401
from lightning_opt.strategies.easgd import EASGDStrategy

out, beta, period = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
max_steps, ckpt_step = int(sys.argv[4]), int(sys.argv[5])
poison = int(sys.argv[6]) if len(sys.argv) > 6 else -1


def flat(tensors):
    return torch.cat([t.detach().reshape(-1).clone() for t in tensors])


def bn_mean(module):
    return next(m.running_mean.clone() for m in module.modules() if isinstance(m, nn.BatchNorm1d))


class Recording(EASGDStrategy):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.pre, self.post, self.center_pre, self.center_post, self.bn_post, self.steps = [], [], [], [], [], []

    def _sync(self, idx, step):
        self.steps.append(step)
        self.pre.append(flat_params(self.lightning_module))
        self.center_pre.append(flat(self._center[idx]))
        super()._sync(idx, step)
        self.post.append(flat_params(self.lightning_module))
        self.center_post.append(flat(self._center[idx]))
        self.bn_post.append(bn_mean(self.lightning_module))


class Checkpointer(pl.Callback):
    """Saves a checkpoint (a collective) after optimizer step ``ckpt_step`` and notes the local weights around it
    and around the validation run at the same step (``val_check_interval=ckpt_step``)."""

    def __init__(self):
        self.x0 = None
        self.before = self.after = self.val = self.resumed = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.val is None:
            self.val = flat_params(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == ckpt_step:
            self.resumed = flat_params(pl_module)

    def on_train_start(self, trainer, pl_module):
        self.x0 = flat_params(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == ckpt_step:
            self.before = flat_params(pl_module)
            trainer.save_checkpoint(out / "mid.ckpt")
            self.after = flat_params(pl_module)
        if trainer.global_rank == poison and trainer.global_step == 4:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


s = Recording(period=period, beta=beta, nonfinite="drop" if poison >= 0 else "raise", timeout=60)
cb = Checkpointer()
model = TinyModel(bn=True)
pl.Trainer(accelerator="cpu", devices=2, strategy=s, max_steps=max_steps, callbacks=[cb], use_distributed_sampler=False,
           logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
           num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=ckpt_step).fit(model)
torch.save({"pre": torch.stack(s.pre), "post": torch.stack(s.post), "center_pre": torch.stack(s.center_pre),
            "center_post": torch.stack(s.center_post), "bn_post": torch.stack(s.bn_post), "steps": s.steps,
            "x0": cb.x0, "ckpt_before": cb.before, "ckpt_after": cb.after,
            "val": cb.val, "after_val": cb.resumed, "final": flat_params(model),
            "center_final": flat(s._center[0]), "alpha": s.alpha}, out / f"rank{rank()}.pt")
