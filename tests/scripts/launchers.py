"""One launcher × every strategy with the stateful callbacks: each case trains ``TinyModel`` (BatchNorm, SGD with
momentum, unshuffled shards) on 2 ranks and records, per rank, the flat parameters after every step, what the
callbacks logged, and LSGD's leader history. The test compares launchers (and Lightning packages) case by case.

Usage: launchers.py OUT LAUNCHER [CASE,...]     LAUNCHER: popen | spawn | fork | torchrun
(popen: Lightning re-runs this script for rank 1; spawn / fork: Lightning starts both ranks from this process for
every fit; torchrun: ``python -m torch.distributed.run --standalone --nproc_per_node=2 launchers.py OUT torchrun``,
which also checkpoints at step 3 (an epoch end, mid-period) and resumes from it, to compare with the uninterrupted run.)
The Lightning package is the default namespace's (``LIGHTNING_OPT_PACKAGE``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from _common import CaptureLogger, TinyModel, flat_params, pl

from lightning_opt.callbacks import GradientNoiseMonitor, GradNormMonitor, SharpnessMonitor, TimeAverageMonitor
from lightning_opt.strategies import EASGDStrategy, LocalSGDStrategy, LookaheadStrategy, LSGDStrategy

MAX_STEPS, RESUME_AT = 6, 3


def cases(start_method: str) -> dict:
    kw = {"start_method": start_method, "timeout": 60}
    return {
        "local_sgd_outer": (LocalSGDStrategy(period=2, outer_lr=0.7, outer_momentum=0.6, **kw),
                            lambda: [GradNormMonitor(every_n_steps=1), TimeAverageMonitor()]),
        "lsgd": (LSGDStrategy(period=2, pull=0.25, leader_window=2, **kw),
                 lambda: [GradientNoiseMonitor(every_n_steps=2, num_batches=2, bootstrap=10), TimeAverageMonitor()]),
        "lsgd_multi": (LSGDStrategy(period=2, pull=0.25, leader_window=2, group_size=1, global_period=4,
                                    global_pull=0.6, **kw), lambda: []),
        "lookahead_sync": (LookaheadStrategy(period=2, alpha=0.3, mode="sync", pullback_momentum="pullback", **kw),
                           lambda: [SharpnessMonitor(every_n_steps=3, max_iter=4), GradNormMonitor(every_n_steps=1)]),
        "lookahead_local": (LookaheadStrategy(period=3, alpha=0.3, mode="local", **kw),
                            lambda: [TimeAverageMonitor()]),
        "easgd": (EASGDStrategy(period=2, beta=0.43, **kw), lambda: []),
    }


class StepIndexed(TinyModel):
    """Step ``k`` trains on this rank's batch ``k mod 3`` whatever the loader yields: Lightning replays batches
    when it resumes from an epoch-end checkpoint of a non-stateful loader, which is not what this test is about."""

    def training_step(self, batch, batch_idx):
        batches = list(self._loader())
        return super().training_step(batches[self.trainer.global_step % len(batches)], batch_idx)


class Record(pl.Callback):
    """Saves this rank's trajectory, logged metrics and strategy history at the end of the fit."""

    def __init__(self, path: Path) -> None:
        self.path, self.params = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params.append(flat_params(pl_module))

    def on_train_end(self, trainer, pl_module):
        logged = [row for lg in trainer.loggers if isinstance(lg, CaptureLogger) for row in lg.calls]
        history = getattr(trainer.strategy, "history", [])
        torch.save({"params": torch.stack(self.params), "final": flat_params(pl_module), "logged": logged,
                    "history": [(h["step"], h["scores"], h["leader"]) for h in history]},
                   f"{self.path}.rank{trainer.global_rank}.pt")


def fit(strategy, callbacks: list, path: Path, max_steps: int = MAX_STEPS, ckpt_path=None, extra=()) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=max_steps, use_distributed_sampler=False,
        callbacks=[*callbacks, Record(path), *extra], logger=CaptureLogger(), log_every_n_steps=1,
        enable_checkpointing=bool(extra), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(StepIndexed(lr=0.05, momentum=0.9, n=48), ckpt_path=ckpt_path)  # 3 batches per epoch and rank


def main() -> None:
    out, launcher = Path(sys.argv[1]), sys.argv[2]
    only = sys.argv[3].split(",") if len(sys.argv) > 3 else None
    start_method = {"popen": "popen", "torchrun": "popen", "spawn": "spawn", "fork": "fork"}[launcher]
    for name, (strategy, callbacks) in cases(start_method).items():
        if only and name not in only:
            continue
        if launcher != "torchrun":
            fit(strategy, callbacks(), out / name)
            continue
        ckpt_dir = out / f"ckpt_{name}"
        # at the end of the first epoch (step 3), in the middle of a period
        every = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1, filename="{step}")
        fit(strategy, callbacks(), out / name, extra=[every])
        fresh, more = cases(start_method)[name]
        fit(fresh, more(), out / f"{name}_resumed", ckpt_path=ckpt_dir / f"step={RESUME_AT}.ckpt")
    if int(os.environ.get("RANK", "0")) == 0:
        (out / f"done_{launcher}").write_text("ok")


if __name__ == "__main__":
    main()
