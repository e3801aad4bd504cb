"""Rank script run under torchrun (issue 22). argv: OUT MODE [NPROC_SEEN]. MODE ``kill``: during attempt i
(``TORCHELASTIC_RESTART_COUNT``), rank 1 SIGKILLs itself after step 8 of the i-th case (mid-period: the periods
end at steps 3, 6, 9, 12), and torchrun restarts every worker; each case then resumes through AutoResume. MODE
``plain``: the same fits, uninterrupted. A case that has finished is skipped on a restart. Each rank saves, per
case, its final weights, what rank 0 logged, when the kill happened and when training started again.

Six batches per rank and epoch, checkpoints after every 2nd sync (steps 6 and 12): epoch ends, so the resume is
exact with Lightning's plain DataLoader. MODE ``resize``: ``local_sgd_outer`` continued to step 18 with whatever
world size torchrun gives, from the checkpoints a ``plain`` run left in OUT (the world-size test)."""

import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
from _common import CaptureLogger, TinyModel, flat_params, make_data, pl, trainer

from lightning_opt.callbacks import AutoResume
from lightning_opt.strategies import LocalSGDStrategy, LookaheadStrategy, LSGDStrategy

out, mode = Path(sys.argv[1]), sys.argv[2]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
CASES = {
    "local_sgd_outer": lambda: LocalSGDStrategy(period=3, outer_lr=0.7, outer_momentum=0.6, timeout=60),
    "lsgd": lambda: LSGDStrategy(period=3, pull=0.25, leader_window=2, timeout=60),
    "lookahead": lambda: LookaheadStrategy(period=3, alpha=0.3, mode="local", timeout=60),
}


class KillAfter(pl.Callback):
    def __init__(self, step: int, marker: Path) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.marker.write_text(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)


class TrainingAgain(pl.Callback):
    """When this attempt's first optimizer step ended (the restart is training again)."""

    def __init__(self) -> None:
        self.at = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.at = self.at or time.time()


class FullLoss(pl.Callback):
    """The loss on the whole dataset where this fit starts (after any resume) and where it ends."""

    def __init__(self) -> None:
        self.start = self.end = None

    @staticmethod
    def _loss(pl_module) -> float:
        x, y = make_data(96).tensors
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(pl_module(x), y))

    def on_train_start(self, trainer, pl_module):
        self.start = self._loss(pl_module)

    def on_train_end(self, trainer, pl_module):
        self.end = self._loss(pl_module)


def run(case: str, index: int, max_steps: int = 12, tag: str = "") -> None:
    run_dir = out / case
    if (run_dir / f"done{rank}{tag}").exists():
        return
    logger, again, full = CaptureLogger(), TrainingAgain(), FullLoss()
    callbacks = [AutoResume(run_dir, every_n_syncs=2), again, full]
    if mode == "kill" and index == attempt and rank == 1:
        callbacks.append(KillAfter(8, run_dir / "killed_at"))
    run_dir.mkdir(parents=True, exist_ok=True)
    model = TinyModel(bn=False, momentum=0.5, lr=0.02, n=96)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = trainer(CASES[case](), max_steps=max_steps, callbacks=callbacks, devices=world,
                      enable_checkpointing=True, logger=logger)
        fit.fit(model)
    torch.save({"weights": flat_params(model), "logged": logger.calls, "training_again": again.at,
                "full_loss": (full.start, full.end), "steps_run": len(model.losses), "attempt": attempt,
                "warnings": [str(w.message) for w in caught]},
               run_dir / f"rank{rank}{tag}.pt")
    (run_dir / f"done{rank}{tag}").write_text(json.dumps({"attempt": attempt}))


if mode == "resize":
    run("local_sgd_outer", -1, max_steps=18, tag=f"_world{world}")
else:
    for i, name in enumerate(CASES):
        run(name, i)
