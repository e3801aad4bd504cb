"""One rank of the throttled-link benchmark (``benchmarks/bench_throttled.py`` starts both ranks).

    RANK=0 LOCAL_RANK=0 NODE_RANK=0 WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... \\
        python benchmarks/scripts/throttled_rank.py <strategy>:<period>:<steps> [<strategy>:<period>:<steps> ...]

Runs one ``trainer.fit`` per spec in the order given (the process group is created by the first distributed fit
and reused, so the start-up cost of Python, torch and Lightning is paid once per process pair). Each rank is its
own "node" (``num_nodes=2, devices=1``), except in ``alone`` fits: there each rank trains by itself
(``devices=1, num_nodes=1``, Lightning's default single-device strategy, no collective at all; a process group left
by an earlier fit is simply not used) on the same data shard, the ceiling that communication can only lower. Every
fit starts with a barrier (outside the timed part, when a process group exists), so the two ranks start together.

Each fit trains a wide MLP (about 2.2M parameters by default, ``BENCH_WIDTH``; compute per step is kept small on
purpose so the link dominates) from the same initial weights on a fixed synthetic teacher-labelled task, records
every optimizer step's wall time (since ``on_train_start``) and this rank's minibatch loss, and prints one
``RESULT {json}`` line per fit, with the strategy's ``CommMeter`` figures. No extra communication is added for the
measurement: the launcher averages the two ranks' loss traces afterwards. The streaming rows take their options
from ``BENCH_FRAGMENTS``, ``BENCH_OVERLAP`` and ``BENCH_MERGE_MIX``.
"""

import json
import os
import sys
import time
from datetime import timedelta

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from _mlp import BenchMLP
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lightning_opt  # noqa: F401
from lightning_opt.strategies import LocalSGDStrategy, LookaheadStrategy, LSGDStrategy

specs = [(name, int(period), int(steps)) for name, period, steps in (spec.split(":") for spec in sys.argv[1:])]
width = int(os.environ.get("BENCH_WIDTH", 1024))
world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
stream_opts = {"fragments": int(os.environ.get("BENCH_FRAGMENTS", 4)),
               "overlap_steps": int(os.environ.get("BENCH_OVERLAP", 2)),
               "merge_mix": float(os.environ.get("BENCH_MERGE_MIX", 0.5))}
WARMUP = 4  # optimizer steps excluded from the steps/s figure (first-iteration allocations, connection set-up)
IN_DIM, CLASSES, N_TRAIN, BATCH = 64, 10, 16384, 32
torch.set_num_threads(1)


def teacher_data() -> TensorDataset:
    """Inputs ~ N(0, I); labels = argmax of a fixed random 2-layer teacher net (learnable, not trivially)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N_TRAIN, IN_DIM, generator=g)
    w1 = torch.randn(IN_DIM, 128, generator=g) / IN_DIM ** 0.5
    w2 = torch.randn(128, CLASSES, generator=g) / 128 ** 0.5
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    return TensorDataset(x, y)


class ShardMLP(BenchMLP):
    """:class:`BenchMLP` reading this rank's shard by the launch ``RANK``, not the trainer's rank (0 in an ``alone``
    fit), so an ``alone`` rank sees exactly the batches it sees in the distributed fits."""

    def train_dataloader(self):
        ds = self.dataset()
        sampler = DistributedSampler(ds, self.world, rank, shuffle=True, seed=0)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler)


class Trace(pl.Callback):
    """Wall time after each optimizer step (incl. any synchronisation it triggered) and the minibatch loss."""

    def __init__(self):
        self.times: list[float] = []
        self.losses: list[float] = []

    def on_train_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self.t0)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))  # one .item() per step: negligible next to the step itself


COLLECTIVE_TIMEOUT = 180.0


def streaming(comm_dtype: str):
    return lambda period: LocalSGDStrategy(period=period, comm_dtype=comm_dtype, timeout=COLLECTIVE_TIMEOUT,
                                           **stream_opts)


STRATEGIES = {
    "alone": None,  # Lightning's default single-device strategy, num_nodes=1
    "ddp": lambda period: DDPStrategy(timeout=timedelta(seconds=COLLECTIVE_TIMEOUT)),
    "local_sgd": lambda period: LocalSGDStrategy(period=period, timeout=COLLECTIVE_TIMEOUT),
    "lsgd": lambda period: LSGDStrategy(period=period, pull=0.5, leader_window=4, timeout=COLLECTIVE_TIMEOUT),
    "lookahead_local": lambda period: LookaheadStrategy(period=period, mode="local", timeout=COLLECTIVE_TIMEOUT),
    "stream_fp32": streaming("float32"),
    "stream_bf16": streaming("bfloat16"),
    "stream_int8": streaming("int8"),
}


def run(name: str, period: int, steps: int) -> dict:
    trace = Trace()
    common = dict(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                  callbacks=[trace])
    if name == "alone":
        trainer = pl.Trainer(num_nodes=1, **common)
    else:
        trainer = pl.Trainer(num_nodes=world, strategy=STRATEGIES[name](period), **common)
    model = ShardMLP(teacher_data, in_dim=IN_DIM, width=width, classes=CLASSES, batch_size=BATCH, world=world)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # both ranks start this fit together (untimed; no process group exists before the first)
    trainer.fit(model)
    nparams = sum(p.numel() for p in model.parameters())
    meter = getattr(trainer.strategy, "meter", None)
    t = trace.times
    if meter is not None:
        comm = {"bytes_total": meter.bytes, "peak_bytes_per_sync": meter.peak_bytes_per_sync, "syncs": meter.syncs,
                "sync_s": meter.sync_seconds, "overlap_wait_s": meter.overlap_wait_seconds}
    elif name == "ddp":  # one all-reduce of the whole fp32 gradient per step
        comm = {"bytes_total": len(t) * nparams * 4, "peak_bytes_per_sync": nparams * 4, "syncs": len(t),
                "sync_s": None, "overlap_wait_s": None}
    else:  # alone: nothing leaves the process
        comm = {"bytes_total": 0, "peak_bytes_per_sync": 0, "syncs": 0, "sync_s": None, "overlap_wait_s": None}
    return {"strategy": name, "period": period, "steps": len(t), "params": nparams, "rank": rank,
            "trainer_world": trainer.world_size, **comm, "bytes_per_step": comm["bytes_total"] / max(len(t), 1),
            "steps_per_s": (len(t) - WARMUP) / (t[-1] - t[WARMUP - 1]),
            "times": [round(v, 4) for v in t], "losses": [round(v, 5) for v in trace.losses]}


for name, _, steps in specs:
    if name not in STRATEGIES:
        raise SystemExit(f"unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}")
    if steps <= WARMUP:
        raise SystemExit(f"{name}: {steps} steps; more than {WARMUP} needed for a steps/s figure")
for name, period, steps in specs:
    print("RESULT " + json.dumps(run(name, period, steps)), flush=True)
