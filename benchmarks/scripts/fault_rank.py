"""One rank of the fault benchmark, run under torchrun: the benchmark MLP (~0.56M parameters) with DiLoCo-style Local
SGD (τ = 8), 240 steps. argv: OUT MODE. MODE ``kill``: AutoResume after every sync, and on the first attempt rank 1
SIGKILLs itself after step 100 (mid-period); ``ckpt``: AutoResume, no kill; ``none``: no AutoResume (the cost
baseline). Rank 0 writes OUT/MODE.json: what it logged, the fit's wall time, when its first step of this attempt
ended; the killed rank writes when it died."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
from _mlp import BenchMLP, argmax_data
from pytorch_lightning.loggers import Logger

from lightning_opt.callbacks import AutoResume
from lightning_opt.strategies import LocalSGDStrategy

out, mode = Path(sys.argv[1]), sys.argv[2]
attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
STEPS, KILL_AT = 240, 100


class Record(Logger, pl.Callback):
    """Logger (what rank 0 logged) and callback (first step's end, the kill) in one."""

    name, version = "record", 0

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[dict] = []
        self.first_step_end: float | None = None

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append({k: float(v) for k, v in metrics.items() if k.startswith("fault/")})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.first_step_end = self.first_step_end or time.time()
        if mode == "kill" and attempt == 0 and rank == 1 and trainer.global_step == KILL_AT:
            (out / "killed_at").write_text(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)


record = Record()
callbacks = [record] + ([AutoResume(out / f"run_{mode}", every_n_syncs=1)] if mode != "none" else [])
trainer = pl.Trainer(accelerator="cpu", devices=world, max_steps=STEPS, logger=record, callbacks=callbacks,
                     strategy=LocalSGDStrategy(period=8, outer_lr=0.7, outer_momentum=0.9, outer_nesterov=True),
                     enable_checkpointing=mode != "none", enable_progress_bar=False, enable_model_summary=False,
                     use_distributed_sampler=False, log_every_n_steps=1)
start = time.perf_counter()
trainer.fit(BenchMLP(argmax_data, in_dim=64, width=512, classes=10, batch_size=32, world=world))
if rank == 0:
    (out / f"{mode}.json").write_text(json.dumps({
        "seconds": time.perf_counter() - start, "first_step_end": record.first_step_end, "attempt": attempt,
        "logged": [m for m in record.logged if m]}))
