"""2-process gloo DDP run with two SharpnessMonitors (ddp_mode global and local); each rank writes rank{r}.json."""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy
from sharpness_common import ShardedTinyNet, exact_hessian

from lightning_opt.callbacks.sharpness import CURVATURE_ATTR, SharpnessMonitor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    pl.seed_everything(0)
    model = ShardedTinyNet()
    glob = SharpnessMonitor(every_n_steps=2, max_iter=120, ddp_mode="auto")
    loc = SharpnessMonitor(every_n_steps=2, max_iter=120, ddp_mode="local", prefix="local")
    logger = TensorBoardLogger(args.out, name="tb")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(timeout=timedelta(seconds=60)),
                         max_steps=4, logger=logger, callbacks=[glob, loc], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         log_every_n_steps=50)
    trainer.fit(model)
    rank = trainer.global_rank

    h_local = exact_hessian(model, glob._fixed.batch)
    ev_local = torch.linalg.eigvalsh(h_local)
    h_global = h_local.clone()
    dist.all_reduce(h_global)
    ev_global = torch.linalg.eigvalsh(h_global / dist.get_world_size())

    ckpt = args.out / "last.ckpt"
    trainer.save_checkpoint(ckpt)  # every rank calls it (the monitor gathers probe batches)
    result = {
        "global": glob.last,
        "local": loc.last,
        "exact_global": [ev_global[0].item(), ev_global[-1].item()],
        "exact_local": [ev_local[0].item(), ev_local[-1].item()],
        "published": getattr(trainer, CURVATURE_ATTR),
        "log_dir": logger.log_dir,
    }
    trainer.strategy.barrier()
    if rank == 0:
        state = torch.load(ckpt, weights_only=False)["callbacks"][glob.state_key]
        probes = state["probe_batches"]
        result["ckpt_probe_batches"] = len(probes)
        result["ckpt_probes_differ"] = not torch.equal(probes[0][0], probes[1][0])
    else:
        root = Path(args.out)
        result["event_files_rank1"] = sum(1 for p in root.rglob("events.out.tfevents.*")
                                          if f"{os.getpid()}" in p.name)
    (args.out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
