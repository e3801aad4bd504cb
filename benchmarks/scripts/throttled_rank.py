"""One rank of the throttled-link benchmark (``benchmarks/bench_throttled.py`` starts both ranks).

    RANK=0 LOCAL_RANK=0 NODE_RANK=0 WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... \\
        python benchmarks/scripts/throttled_rank.py <steps> <strategy>:<period> [<strategy>:<period> ...]

Runs one ``trainer.fit`` per ``strategy:period`` in the order given (the process group is created by the first
fit and reused, so the start-up cost of Python, torch and Lightning is paid once per process pair).
Each rank is its own "node" (``num_nodes=2, devices=1``). Each fit trains a wide MLP (about 2.2M parameters by
default, ``BENCH_WIDTH``; compute per step is kept small on purpose so the link dominates) from the same initial
weights on a fixed synthetic teacher-labelled task, records every optimizer step's wall time (since
``on_train_start``) and this rank's minibatch loss, and prints one ``RESULT {json}`` line per fit. No extra
communication is added for the measurement: the launcher averages the two ranks' loss traces afterwards.
"""

import json
import os
import sys
import time
from datetime import timedelta

import pytorch_lightning as pl
import torch
from _mlp import BenchMLP
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import TensorDataset

import lightning_opt  # noqa: F401
from lightning_opt.strategies import LocalSGDStrategy, LookaheadStrategy, LSGDStrategy

steps = int(sys.argv[1])
specs = [(spec.split(":")[0], int(spec.split(":")[1])) for spec in sys.argv[2:]]
width = int(os.environ.get("BENCH_WIDTH", 1024))
world = int(os.environ["WORLD_SIZE"])
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
STRATEGIES = {
    "ddp": lambda period: DDPStrategy(timeout=timedelta(seconds=COLLECTIVE_TIMEOUT)),
    "local_sgd": lambda period: LocalSGDStrategy(period=period, timeout=COLLECTIVE_TIMEOUT),
    "lsgd": lambda period: LSGDStrategy(period=period, pull=0.5, leader_window=4, timeout=COLLECTIVE_TIMEOUT),
    "lookahead_local": lambda period: LookaheadStrategy(period=period, mode="local", timeout=COLLECTIVE_TIMEOUT),
}


def run(name: str, period: int) -> dict:
    trace = Trace()
    trainer = pl.Trainer(accelerator="cpu", devices=1, num_nodes=world, strategy=STRATEGIES[name](period),
                         max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, callbacks=[trace])
    model = BenchMLP(teacher_data, in_dim=IN_DIM, width=width, classes=CLASSES, batch_size=BATCH, world=world)
    trainer.fit(model)
    nparams = sum(p.numel() for p in model.parameters())
    meter = getattr(trainer.strategy, "meter", None)
    t = trace.times
    bytes_total = meter.bytes if meter is not None else len(t) * nparams * 4  # DDP: all-reduce of every gradient
    return {"strategy": name, "period": period, "steps": len(t), "params": nparams, "rank": trainer.global_rank,
            "bytes_per_step": bytes_total / max(len(t), 1),
            "steps_per_s": (len(t) - WARMUP) / (t[-1] - t[WARMUP - 1]),
            "times": [round(v, 4) for v in t], "losses": [round(v, 5) for v in trace.losses]}


for name, _ in specs:
    if name not in STRATEGIES:
        raise SystemExit(f"unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}")
for name, period in specs:
    print("RESULT " + json.dumps(run(name, period)), flush=True)
