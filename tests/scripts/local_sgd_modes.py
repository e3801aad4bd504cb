"""Rank script: step counting under gradient accumulation, manual optimisation and two optimizers."""

import sys
from pathlib import Path

import torch
from _common import Recorder, TinyModel, first_layer_and_rest, rank, trainer

import lightning_opt  # noqa: F401
from lightning_opt.strategies import LocalSGDStrategy

out = Path(sys.argv[1])
results = {}

# (a) gradient accumulation: 2 batches per optimizer step, τ=2 → a sync every 4 batches
s, rec, m = LocalSGDStrategy(period=2, timeout=60), Recorder(), TinyModel(bn=False)
trainer(s, max_steps=4, callbacks=[rec], accumulate_grad_batches=2).fit(m)
results["accum"] = {"params": torch.stack(rec.params), "syncs": s.meter.syncs, "steps": dict(s.clock.steps)}


class TwoOptimizers(TinyModel):
    """Manual optimisation: optimizer A (first layer) steps every batch, B (the rest) every other batch."""

    def __init__(self):
        super().__init__(bn=False)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        if batch_idx % 2 == 1:
            opt_b.step()

    def configure_optimizers(self):
        first, rest = first_layer_and_rest(self)
        return torch.optim.SGD(first, lr=0.05), torch.optim.SGD(rest, lr=0.05)


s, rec, m = LocalSGDStrategy(period=2, timeout=60), Recorder(), TwoOptimizers()
trainer(s, max_steps=-1, max_epochs=1, callbacks=[rec]).fit(m)
results["manual"] = {"params": torch.stack(rec.params), "syncs": s.meter.syncs, "steps": dict(s.clock.steps),
                     "n_first": sum(p.numel() for p in m.net[0].parameters())}
torch.save(results, out / f"rank{rank()}.pt")
