"""One rank of the strategy benchmark: trains an MLP (~1.1M parameters) with a given strategy, prints JSON."""

import json
import os
import sys
import time

import pytorch_lightning as pl
import torch
from _mlp import BenchMLP
from torch.utils.data import TensorDataset

import lightning_opt  # noqa: F401
from lightning_opt.strategies import LocalSGDStrategy, LookaheadStrategy, LSGDStrategy

name, period, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
width = int(os.environ.get("BENCH_WIDTH", 512))
world = int(os.environ["WORLD_SIZE"])
cap = {"bucket_cap_mb": float(os.environ["BENCH_BUCKET_MB"])} if "BENCH_BUCKET_MB" in os.environ else {}


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g)
    return TensorDataset(x, x[:, :10].argmax(1))


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
model = BenchMLP(data, in_dim=64, width=width, classes=10, batch_size=32, world=world)
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
