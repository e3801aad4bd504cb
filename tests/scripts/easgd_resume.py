"""Rank script: EASGD checkpoint mid-period, resume, compare with the uninterrupted run (per-rank local weights).

argv: out_dir
"""

import sys
from pathlib import Path

import torch
from _common import Recorder, TinyModel, rank, trainer
from pytorch_lightning.callbacks import ModelCheckpoint

import lightning_opt  # noqa: F401
from lightning_opt.strategies.easgd import EASGDStrategy

out = Path(sys.argv[1])
centers = {}


def run(tag, max_epochs, ckpt_dir=None, ckpt_path=None):
    model, rec = TinyModel(opt="sgd", momentum=0.9, lr=0.05), Recorder()
    cbs = [rec]
    if ckpt_dir is not None:
        cbs.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1, filename="{epoch}"))
    strategy = EASGDStrategy(period=4, beta=0.6, timeout=60)
    t = trainer(strategy, max_steps=-1, max_epochs=max_epochs, callbacks=cbs, enable_checkpointing=ckpt_dir is not None)
    t.fit(model, ckpt_path=ckpt_path)
    centers[tag] = torch.cat([c.reshape(-1) for c in strategy._center[0]])
    return rec, model


# 6 batches per epoch and τ=4: the epoch-0 checkpoint (step 6) is in the middle of the second period.
rec_full, m_full = run("full", 3, ckpt_dir=out / "ckpt")
rec_res, m_res = run("resumed", 3, ckpt_path=out / "ckpt" / "epoch=0.ckpt")
torch.save({"full": torch.stack(rec_full.params), "resumed": torch.stack(rec_res.params),
            "full_bn": torch.stack(rec_full.bn), "resumed_bn": torch.stack(rec_res.bn),
            "full_final": torch.cat([p.detach().reshape(-1) for p in m_full.parameters()]),
            "res_final": torch.cat([p.detach().reshape(-1) for p in m_res.parameters()]),
            "full_center": centers["full"], "res_center": centers["resumed"]}, out / f"rank{rank()}.pt")
