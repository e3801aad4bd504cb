"""Rank script for LookaheadStrategy: world 1 (reference runs, doubled batch) or world 2 (sync / local modes)."""

import sys
from pathlib import Path

import torch
from _common import WORLD_SIZE, Recorder, TinyModel, rank, trainer

import lightning_opt  # noqa: F401
from lightning_opt.strategies import ConstantHorizon, LocalSGDStrategy, LookaheadStrategy

out = Path(sys.argv[1])
world = WORLD_SIZE
results = {}


def fit(name, strategy, max_steps=12, **model_kw):
    model, rec = TinyModel(bn=False, **model_kw), Recorder()
    p0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    trainer(strategy, max_steps=max_steps, callbacks=[rec]).fit(model)
    results[name] = {"params": torch.stack(rec.params), "p0": p0,
                     "final": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                     "momentum": [s.get("momentum_buffer") for s in model.trainer.optimizers[0].state.values()]}


if world == 1:
    for pb in ("none", "reset", "pullback"):
        fit(f"sgd_{pb}", LookaheadStrategy(period=3, alpha=0.5, pullback_momentum=pb, timeout=60), momentum=0.9)
    fit("adam", LookaheadStrategy(period=3, alpha=0.5, timeout=60), opt="adam", lr=0.01)
    fit("batch16", LookaheadStrategy(period=2, alpha=0.5, timeout=60), max_steps=6, batch_size=16)
else:
    fit("sync", LookaheadStrategy(period=2, alpha=0.5, timeout=60), max_steps=6)
    fit("local", LookaheadStrategy(period=3, alpha=0.5, mode="local", timeout=60))
    fit("localsgd", LocalSGDStrategy(period=3, outer_lr=0.5, timeout=60))

    class Decay(TinyModel):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 6, 0.5),
                                                       "interval": "step"}}

    s = LookaheadStrategy(period=ConstantHorizon(0.3), alpha=0.5, timeout=60)
    m, rec = Decay(bn=False), Recorder()
    trainer(s, max_steps=24, callbacks=[rec]).fit(m)
    results["horizon"] = {"period": s._period_now[0], "syncs": s.meter.syncs}
torch.save(results, out / f"rank{rank()}.pt")
