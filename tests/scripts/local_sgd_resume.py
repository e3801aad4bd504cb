"""Rank script: checkpoint mid-period, resume, compare with the uninterrupted run (per-rank local weights)."""

import sys
from pathlib import Path

import torch
from _common import Recorder, TinyModel, rank, trainer
from pytorch_lightning.callbacks import ModelCheckpoint

import lightning_opt  # noqa: F401
from lightning_opt.strategies import LocalSGDStrategy, LookaheadStrategy, LSGDStrategy

out, opt, strategy_name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
kw = {"opt": opt, "momentum": 0.9 if opt == "sgd" else 0.0, "lr": 0.05 if opt == "sgd" else 0.01}


def make_strategy():
    if strategy_name.startswith("lookahead_"):
        return LookaheadStrategy(period=4, alpha=0.5, mode=strategy_name.split("_")[1], pullback_momentum="pullback",
                                 timeout=60)
    if strategy_name == "lsgd":
        return LSGDStrategy(period=4, pull=0.5, leader_window=3, timeout=60)
    if strategy_name == "outer":
        return LocalSGDStrategy(period=4, outer_lr=0.7, outer_momentum=0.9, outer_nesterov=True, timeout=60)
    return LocalSGDStrategy(period=4, timeout=60)


def run(max_epochs, ckpt_dir=None, ckpt_path=None):
    model, rec = TinyModel(**kw), Recorder()
    cbs = [rec]
    if ckpt_dir is not None:
        cbs.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1, filename="{epoch}"))
    t = trainer(make_strategy(), max_steps=-1, max_epochs=max_epochs, callbacks=cbs,
                enable_checkpointing=ckpt_dir is not None)
    t.fit(model, ckpt_path=ckpt_path)
    return rec, model


# 6 batches per epoch and τ=4: the epoch-1 checkpoint (step 6) is in the middle of the second period.
rec_full, m_full = run(3, ckpt_dir=out / "ckpt")
rec_res, m_res = run(3, ckpt_path=out / "ckpt" / "epoch=0.ckpt")
torch.save({"full": torch.stack(rec_full.params), "resumed": torch.stack(rec_res.params),
            "full_final": torch.cat([p.detach().reshape(-1) for p in m_full.parameters()]),
            "res_final": torch.cat([p.detach().reshape(-1) for p in m_res.parameters()])},
           out / f"rank{rank()}.pt")
