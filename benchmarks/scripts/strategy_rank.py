"""One rank of the strategy benchmark: trains an MLP (~0.56M parameters) with a given strategy, prints JSON.

``alone``: the rank trains by itself (no process group, one device): the no-communication ceiling. Every run
records each optimizer step's wall time and whether it ended in a sync, so the local steps of a periodic strategy
can be compared with a step taken alone."""

import json
import os
import statistics
import sys
import time

name, period, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
world = int(os.environ["WORLD_SIZE"])
if name == "alone":  # no process group: this rank is a plain single-device fit
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from _mlp import BenchMLP  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

import lightning_opt  # noqa: E402, F401
from lightning_opt.strategies import LocalSGDStrategy, LookaheadStrategy, LSGDStrategy  # noqa: E402

width = int(os.environ.get("BENCH_WIDTH", 512))
cap = {"bucket_cap_mb": float(os.environ["BENCH_BUCKET_MB"])} if "BENCH_BUCKET_MB" in os.environ else {}
SKIP = 10  # warm-up iterations left out of every figure


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g)
    return TensorDataset(x, x[:, :10].argmax(1))


class StepTimes(pl.Callback):
    """Wall time of every optimizer step after ``SKIP``, and whether a sync ran in it."""

    def __init__(self) -> None:
        self.times: list[tuple[float, bool]] = []

    def _syncs(self, trainer) -> int:
        meter = getattr(trainer.strategy, "meter", None)
        return meter.syncs if meter is not None else 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == SKIP:
            self.t0 = time.perf_counter()
        self.start, self.syncs = time.perf_counter(), self._syncs(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > SKIP:
            self.times.append((time.perf_counter() - self.start, self._syncs(trainer) > self.syncs))

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.t0
        self.loss = float(trainer.callback_metrics["train/loss"])


strategies = {
    "alone": lambda: "auto",
    "ddp": lambda: "ddp",
    "local_sgd": lambda: LocalSGDStrategy(period=period),
    "lsgd": lambda: LSGDStrategy(period=period, pull=0.5, leader_window=4),
    "lookahead_sync": lambda: LookaheadStrategy(period=period, mode="sync", **cap),
    "lookahead_local": lambda: LookaheadStrategy(period=period, mode="local"),
    # every step a warm-up step: gradients averaged as DDP does (the path every strategy's warm-up takes)
    "local_sgd_warmup": lambda: LocalSGDStrategy(period=period, warmup_steps=10 * steps),
    "lsgd_warmup": lambda: LSGDStrategy(period=period, warmup_steps=10 * steps),
}
timer = StepTimes()
trainer = pl.Trainer(accelerator="cpu", devices=1 if name == "alone" else world, strategy=strategies[name](),
                     max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, use_distributed_sampler=False, callbacks=[timer])
model = BenchMLP(data, in_dim=64, width=width, classes=10, batch_size=32, world=world)
trainer.fit(model)
s = trainer.strategy
nparams = sum(p.numel() for p in model.parameters())
bytes_total = getattr(getattr(s, "meter", None), "bytes", None)
if bytes_total is None:  # DDP: one all-reduce of every gradient per step; alone: nothing
    bytes_total = 0 if name == "alone" else steps * nparams * 4
local = [t for t, synced in timer.times if not synced]
if trainer.global_rank == 0:
    print("RESULT " + json.dumps({"strategy": name, "period": period, "steps": steps, "params": nparams,
                                  "bytes_per_step": bytes_total / steps,
                                  "steps_per_s": (steps - SKIP) / timer.seconds, "loss": timer.loss,
                                  "local_step_ms": 1e3 * statistics.median(local) if local else None}))
