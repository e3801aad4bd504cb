"""Script (not a rank script): rank 1 hangs in ``training_step`` at step 3; rank 0 times out at the sync after
step 4. Lightning's popen launcher starts rank 1; argv: out_dir timeout_seconds. Rank 1 writes its PID first."""

import os
import sys
import time
from pathlib import Path

from _common import TinyModel, pl

from lightning_opt.strategies import LocalSGDStrategy

out = Path(sys.argv[1])


class Stuck(TinyModel):
    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.global_step == 3:
            (out / "stuck.pid").write_text(str(os.getpid()))
            time.sleep(3600)
        return super().training_step(batch, batch_idx)


if __name__ == "__main__":
    pl.Trainer(accelerator="cpu", devices=2, strategy=LocalSGDStrategy(period=2, timeout=float(sys.argv[2])),
               max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, use_distributed_sampler=False).fit(Stuck())
