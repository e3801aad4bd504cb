"""One rank of the strategy benchmark: trains an MLP (~1.1M parameters) with a given strategy, prints JSON."""

import json
import os
import sys
import time

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lightning_opt  # noqa: F401
from lightning_opt.strategies import LocalSGDStrategy, LookaheadStrategy, LSGDStrategy

name, period, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
width = int(os.environ.get("BENCH_WIDTH", 512))
world = int(os.environ["WORLD_SIZE"])
cap = {"bucket_cap_mb": float(os.environ["BENCH_BUCKET_MB"])} if "BENCH_BUCKET_MB" in os.environ else {}


class MLP(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4096, 64, generator=g)
        y = (x[:, :10].argmax(1))
        ds = TensorDataset(x, y)
        return DataLoader(ds, batch_size=32, sampler=DistributedSampler(ds, world, self.global_rank, shuffle=True))


class Timer(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 10:  # skip warm-up iterations
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.t0
        self.loss = float(trainer.callback_metrics["train/loss"])


strategies = {
    "ddp": lambda: "ddp",
    "local_sgd": lambda: LocalSGDStrategy(period=period),
    "lsgd": lambda: LSGDStrategy(period=period, pull=0.5, leader_window=4),
    "lookahead_sync": lambda: LookaheadStrategy(period=period, mode="sync", **cap),
    "lookahead_local": lambda: LookaheadStrategy(period=period, mode="local"),
}
timer = Timer()
trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategies[name](), max_steps=steps, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     use_distributed_sampler=False, callbacks=[timer])
model = MLP()
trainer.fit(model)
s = trainer.strategy
nparams = sum(p.numel() for p in model.parameters())
bytes_total = getattr(getattr(s, "meter", None), "bytes", None)
if bytes_total is None:  # DDP: one all-reduce of every gradient per step
    bytes_total = steps * nparams * 4
if trainer.global_rank == 0:
    print("RESULT " + json.dumps({"strategy": name, "period": period, "steps": steps, "params": nparams,
                                  "bytes_per_step": bytes_total / steps,
                                  "steps_per_s": (steps - 10) / timer.seconds, "loss": timer.loss}))
