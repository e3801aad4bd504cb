"""One rank of the strategy benchmark: trains an MLP (~0.56M parameters) once per row and round, in this one process
pair, and prints one JSON line per fit.

    strategy_rank.py ROWS STEPS ROUNDS [MODEL]   # ROWS: "ddp:1,lookahead_sync:5,..." (name:period)

MODEL: ``mlp`` (default; 64-512-512-512-10, 8 tensors) or ``deep`` (80 blocks of Linear 64 + LayerNorm, 324
tensors of about the same total size as the MLP's half: per-parameter Python work shows there).

Every row runs in the same two processes, one after the other, ``ROUNDS`` times over: a row and DDP are then
measured on the same cores, in the same process placement, minutes apart at most, which is what makes their ratio
steadier than that of figures from separate launches. ``alone``: the rank trains by itself on a
``SingleDeviceStrategy`` (no collective at all): the no-communication ceiling. Every fit records each optimizer
step's wall time and whether it ended in a sync, so the local steps of a periodic strategy can be compared with a
step taken alone, the first step after a sync apart from the others. ``torch_loop``: the control, a plain PyTorch
loop (no Lightning, no lightning_opt) that all-reduces the weights every τ steps over the same gloo group."""

import json
import os
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
MODEL = sys.argv[4] if len(sys.argv) > 4 else "mlp"
SKIP = 10  # warm-up iterations left out of every figure


def bench_model() -> BenchMLP:
    if MODEL == "deep":
        return BenchMLP(argmax_data, in_dim=64, width=64, classes=10, batch_size=32, world=2, blocks=80)
    return BenchMLP(argmax_data, in_dim=64, width=512, classes=10, batch_size=32, world=2)


class StepTimes(pl.Callback):
    """Wall time of every optimizer step after ``SKIP``, whether a sync ran in it, and whether the step before it
    synced (the first local step of a period)."""

    def __init__(self) -> None:
        self.times: list[tuple[float, bool, bool]] = []
        self.after_sync = False

    def _syncs(self, trainer) -> int:
        meter = getattr(trainer.strategy, "meter", None)
        return meter.syncs if meter is not None else 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == SKIP:
            self.t0 = time.perf_counter()
        self.start, self.syncs = time.perf_counter(), self._syncs(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        synced = self._syncs(trainer) > self.syncs
        if trainer.global_step > SKIP:
            self.times.append((time.perf_counter() - self.start, synced, self.after_sync))
        self.after_sync = synced

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.t0
        self.loss = float(trainer.callback_metrics["train/loss"])


def local_medians(times: list[tuple[float, bool, bool]]) -> dict:
    """Median ms of the steps without a sync: all of them, the first of a period (right after a sync) and the
    others (None where there are none)."""
    def med(ts):
        return 1e3 * statistics.median(ts) if ts else None
    local = [(t, first) for t, synced, first in times if not synced]
    return {"local_step_ms": med([t for t, _ in local]), "first_local_ms": med([t for t, first in local if first]),
            "later_local_ms": med([t for t, first in local if not first])}


def raw_fit(period: int) -> dict:
    """The control: the same MLP, data and SGD in a plain PyTorch loop (no Lightning, no lightning_opt) that
    all-reduces the weights every ``period`` steps over the same gloo group: what a collective costs the steps
    after it on these cores, with none of our code involved."""
    model = bench_model()
    opt = model.configure_optimizers()

    def batches():
        while True:
            yield from model.train_dataloader()

    loader = batches()
    times, after_sync = [], False
    for step in range(1, steps + 1):
        start = time.perf_counter()
        x, y = next(loader)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.net(x), y).backward()
        opt.step()
        synced = step % period == 0
        if synced:
            with torch.no_grad():
                flat = torch.cat([p.reshape(-1) for p in model.parameters()])
                torch.distributed.all_reduce(flat)
                torch.nn.utils.vector_to_parameters(flat / torch.distributed.get_world_size(), model.parameters())
        if step > SKIP:
            times.append((time.perf_counter() - start, synced, after_sync))
        after_sync = synced
    return {"strategy": "torch_loop", "period": period, "steps": steps, "bytes_per_step": 0.0,
            "params": sum(p.numel() for p in model.parameters()), "steps_per_s": float("nan"), "loss": float("nan"),
            **local_medians(times)}


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
    model = bench_model()
    trainer.fit(model)
    meter = getattr(trainer.strategy, "meter", None)
    nparams = sum(p.numel() for p in model.parameters())
    # DDP: one all-reduce of every gradient per step; alone: nothing
    bytes_total = meter.bytes if meter is not None else (0 if name == "alone" else steps * nparams * 4)
    return {"strategy": name, "period": period, "steps": steps, "params": nparams,
            "bytes_per_step": bytes_total / steps, "steps_per_s": (steps - SKIP) / timer.seconds, "loss": timer.loss,
            **local_medians(timer.times)}


torch.distributed.init_process_group("gloo")
if os.environ.get("BENCH_PIN", "1") == "1" and hasattr(os, "sched_setaffinity"):
    # one core per rank: unpinned, the two ranks' placement on two cores moved whole fits by ±15% (bimodal medians)
    os.sched_setaffinity(0, {torch.distributed.get_rank() % os.cpu_count()})
for r in range(rounds):
    for name, period in rows:
        result = raw_fit(period) if name == "torch_loop" else fit(name, period)
        if torch.distributed.get_rank() == 0:
            print("RESULT " + json.dumps({**result, "round": r}), flush=True)
