"""Rank script: streamed Local SGD on gloo processes (async all-reduce in float32, async all-gather in int8)."""

import sys
from pathlib import Path

import torch
from _common import Recorder, TinyModel, rank, trainer

from lightning_opt.strategies import LocalSGDStrategy

out = Path(sys.argv[1])
results = {}
for name, comm_dtype in (("fp32", "float32"), ("int8", "int8")):
    model, rec = TinyModel(bn=False, momentum=0.9), Recorder()
    strategy = LocalSGDStrategy(period=4, fragments=2, overlap_steps=1, merge_mix=0.6, outer_lr=0.7,
                                outer_momentum=0.6, outer_nesterov=True, comm_dtype=comm_dtype, timeout=60.0)
    trainer(strategy, max_steps=12, callbacks=[rec]).fit(model)
    results[name] = {"params": torch.stack(rec.params), "comm": strategy.comm_stats,
                     "final": torch.cat([p.detach().reshape(-1) for p in model.parameters()])}
torch.save(results, out / f"rank{rank()}.pt")
