"""2-process gloo DDP run of the cost-aware SharpnessMonitor schedule with rank-dependent step times; each rank
writes the steps it measured to rank{r}.json."""

from __future__ import annotations

import argparse
import json
import time
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.strategies import DDPStrategy
from sharpness_common import ShardedTinyNet

from lightning_opt.callbacks.sharpness import SharpnessMonitor


class Net(ShardedTinyNet):
    def training_step(self, batch, batch_idx):
        # the probe loss runs training_step too, so rank 1's calibration and measurements take longer and the
        # ranks would plan different steps if they did not agree
        time.sleep(0.004 if self.global_rank == 0 else 0.02)
        return super().training_step(batch, batch_idx)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    pl.seed_everything(0)
    glob = SharpnessMonitor(max_overhead=0.5, max_iter=20)
    loc = SharpnessMonitor(max_overhead=0.5, max_iter=20, ddp_mode="local", prefix="local")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(timeout=timedelta(seconds=60)),
                         max_steps=80, logger=False, callbacks=[glob, loc], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(Net())
    result = {"global": [h["step"] for h in glob.history], "local": [h["step"] for h in loc.history]}
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
