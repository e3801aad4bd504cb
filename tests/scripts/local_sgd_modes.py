"""Rank script: step counting under gradient accumulation, manual optimisation and two optimizers."""

import sys
from pathlib import Path

import torch
from _common import Recorder, TinyModel, TwoOptimizers, rank, trainer

import lightning_opt  # noqa: F401
from lightning_opt.strategies import LocalSGDStrategy

out = Path(sys.argv[1])
results = {}

# (a) gradient accumulation: 2 batches per optimizer step, τ=2 → a sync every 4 batches
s, rec, m = LocalSGDStrategy(period=2, timeout=60), Recorder(), TinyModel(bn=False)
trainer(s, max_steps=4, callbacks=[rec], accumulate_grad_batches=2).fit(m)
results["accum"] = {"params": torch.stack(rec.params), "syncs": s.meter.syncs, "steps": dict(s.clock.steps)}


s, rec, m = LocalSGDStrategy(period=2, timeout=60), Recorder(), TwoOptimizers()
trainer(s, max_steps=-1, max_epochs=1, callbacks=[rec]).fit(m)
results["manual"] = {"params": torch.stack(rec.params), "syncs": s.meter.syncs, "steps": dict(s.clock.steps),
                     "n_first": sum(p.numel() for p in m.net[0].parameters())}
torch.save(results, out / f"rank{rank()}.pt")
