"""Rank script: only rank 0 receives SIGTERM, after local step 5 of Local SGD (τ = 4). Each rank prints where it
stopped: rank 0 after its step (Lightning raises at the end of the batch that saw the signal), the others at the
start of the next step that communicates (step 8), where the flag is broadcast (strategies/_sigterm.py)."""

import os
import signal

from _common import TinyModel, pl, trainer

from lightning_opt.strategies import LocalSGDStrategy


class SigtermRankZero(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 0 and trainer.global_step == 5:
            os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    fit = trainer(LocalSGDStrategy(period=4, timeout=60), max_steps=12, callbacks=[SigtermRankZero()])
    try:
        fit.fit(TinyModel(bn=False))
        print(f"FINISHED {fit.global_rank} {fit.global_step}", flush=True)
    except BaseException as exc:  # noqa: BLE001 - the test reads how each rank ended
        print(f"STOPPED {fit.global_rank} {fit.global_step} {type(exc).__name__}", flush=True)
