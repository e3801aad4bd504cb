"""Rank script: Local SGD whose period follows the λ_min that SharpnessMonitor publishes on the trainer."""

import sys
from pathlib import Path

import torch
from _common import TinyModel, rank, trainer

import lightning_opt  # noqa: F401
from lightning_opt.callbacks import SharpnessMonitor
from lightning_opt.strategies import CurvatureAdaptivePeriod, LocalSGDStrategy


class Record(LocalSGDStrategy):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.log_ = []

    def _schedule_next(self, idx, step):
        super()._schedule_next(idx, step)
        info = getattr(self.lightning_module.trainer, "lightning_opt_curvature", None)
        self.log_.append((step, self.clock.period[idx], None if info is None else dict(info)))


schedule = CurvatureAdaptivePeriod(c=0.5, min_period=1, max_period=40, default_period=2)
s = Record(period=schedule, timeout=60)
model = TinyModel(bn=False, lr=0.05)
trainer(s, max_steps=24, callbacks=[SharpnessMonitor(every_n_steps=2, max_iter=15)]).fit(model)
torch.save({"log": s.log_, "lr": 0.05}, Path(sys.argv[1]) / f"rank{rank()}.pt")
