"""Rank script for LookaheadStrategy on 2 processes: sync mode (gradients averaged every step) and local mode
(the multi-agent form). The single-process rules are checked in process (tests/test_strategy_reference.py)."""

import sys
from pathlib import Path

import torch
from _common import Recorder, TinyModel, rank, trainer

import lightning_opt  # noqa: F401
from lightning_opt.strategies import LookaheadStrategy

out = Path(sys.argv[1])
results = {}


def fit(name, strategy, max_steps=12):
    model, rec = TinyModel(bn=False), Recorder()
    trainer(strategy, max_steps=max_steps, callbacks=[rec]).fit(model)
    results[name] = {"params": torch.stack(rec.params),
                     "final": torch.cat([p.detach().reshape(-1) for p in model.parameters()])}


fit("sync", LookaheadStrategy(period=2, alpha=0.3, timeout=60), max_steps=6)
fit("local", LookaheadStrategy(period=3, alpha=0.3, mode="local", timeout=60))
torch.save(results, out / f"rank{rank()}.pt")
