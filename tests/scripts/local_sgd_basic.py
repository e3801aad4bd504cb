"""Rank script: DDP vs Local SGD (τ=1), τ=4 with warmup, buffers, outer optimizer, ConstantHorizon."""

import sys
from datetime import timedelta
from pathlib import Path

import torch
from _common import Recorder, TinyModel, rank, trainer
from pytorch_lightning.strategies import DDPStrategy

import lightning_opt  # noqa: F401  (registers the strategy names)
from lightning_opt.strategies import ConstantHorizon, LocalSGDStrategy

out = Path(sys.argv[1])
T = 60.0
results = {}


def fit(name, strategy, max_steps=12, **model_kw):
    model, rec = TinyModel(**model_kw), Recorder()
    trainer(strategy, max_steps=max_steps, callbacks=[rec]).fit(model)
    results[name] = {"params": torch.stack(rec.params), "bn": torch.stack(rec.bn),
                     "final": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                     "comm": getattr(strategy, "comm_stats", None)}
    return model


fit("ddp", DDPStrategy(timeout=timedelta(seconds=T)))
fit("tau1", LocalSGDStrategy(period=1, timeout=T))
fit("tau4_warm3", LocalSGDStrategy(period=4, warmup_steps=3, timeout=T))
fit("tau4_nobuf", LocalSGDStrategy(period=4, average_buffers=False, timeout=T))
fit("outer", LocalSGDStrategy(period=3, outer_lr=0.7, outer_momentum=0.9, outer_nesterov=True, timeout=T), bn=False)
s = LocalSGDStrategy(period=ConstantHorizon(0.4), timeout=T)


class Drop(torch.optim.lr_scheduler.StepLR):
    pass


class HorizonModel(TinyModel):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 8, 0.2),
                                                   "interval": "step"}}


m, rec = HorizonModel(), Recorder()
trainer(s, max_steps=40, callbacks=[rec]).fit(m)
results["horizon"] = {"params": torch.stack(rec.params), "syncs": s.meter.syncs, "period": s.clock.period[0],
                      "bytes": s.meter.bytes, "ddp_bytes": s.meter.ddp_bytes}
torch.save(results, out / f"rank{rank()}.pt")
