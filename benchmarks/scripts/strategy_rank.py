"""One rank of the strategy benchmark: trains an MLP (~0.56M parameters) once per row and round, in this one process
pair, and prints one JSON line per fit.

    strategy_rank.py ROWS STEPS ROUNDS       # ROWS: "ddp:1,lookahead_sync:5,..." (name:period)

Every row runs in the same two processes, one after the other, ``ROUNDS`` times over: a row and DDP are then
measured on the same cores, in the same process placement, minutes apart at most, which is what makes their ratio
steadier than that of figures from separate launches. ``alone``: the rank trains by itself on a
``SingleDeviceStrategy`` (no collective at all): the no-communication ceiling. Every fit records each optimizer
step's wall time and whether it ended in a sync, so the local steps of a periodic strategy can be compared with a
step taken alone."""

import json
import statistics
import sys
import time

import pytorch_lightning as pl
import torch
from _mlp import BenchMLP, argmax_data
from pytorch_lightning.strategies import SingleDeviceStrategy

import lightning_opt  # noqa: F401
from lightning_opt.strategies import LocalSGDStrategy, LookaheadStrategy, LSGDStrategy

rows = [(name, int(period)) for name, period in (r.split(":") for r in sys.argv[1].split(","))]
steps, rounds = int(sys.argv[2]), int(sys.argv[3])
SKIP = 10  # warm-up iterations left out of every figure


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


def strategy(name: str, period: int):
    return {
        "alone": lambda: SingleDeviceStrategy(torch.device("cpu")),
        "ddp": lambda: "ddp",
        "local_sgd": lambda: LocalSGDStrategy(period=period),
        "lsgd": lambda: LSGDStrategy(period=period, pull=0.5, leader_window=4),
        "lookahead_sync": lambda: LookaheadStrategy(period=period, mode="sync"),
        "lookahead_local": lambda: LookaheadStrategy(period=period, mode="local"),
        # every step a warm-up step: gradients averaged as DDP does (the path every strategy's warm-up takes)
        "local_sgd_warmup": lambda: LocalSGDStrategy(period=period, warmup_steps=10 * steps),
        "lsgd_warmup": lambda: LSGDStrategy(period=period, warmup_steps=10 * steps),
    }[name]()


def fit(name: str, period: int) -> dict:
    world = 1 if name == "alone" else 2
    timer = StepTimes()
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy(name, period), max_steps=steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, callbacks=[timer])
    model = BenchMLP(argmax_data, in_dim=64, width=512, classes=10, batch_size=32, world=2)
    trainer.fit(model)
    meter = getattr(trainer.strategy, "meter", None)
    nparams = sum(p.numel() for p in model.parameters())
    # DDP: one all-reduce of every gradient per step; alone: nothing
    bytes_total = meter.bytes if meter is not None else (0 if name == "alone" else steps * nparams * 4)
    local = [t for t, synced in timer.times if not synced]
    return {"strategy": name, "period": period, "steps": steps, "params": nparams,
            "bytes_per_step": bytes_total / steps, "steps_per_s": (steps - SKIP) / timer.seconds, "loss": timer.loss,
            "local_step_ms": 1e3 * statistics.median(local) if local else None}


torch.distributed.init_process_group("gloo")
for r in range(rounds):
    for name, period in rows:
        result = fit(name, period)
        if torch.distributed.get_rank() == 0:
            print("RESULT " + json.dumps({**result, "round": r}), flush=True)
