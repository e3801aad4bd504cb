"""Rank script for a simulated 2-node job: ``Trainer(num_nodes=2, devices=2)``, 4 ranks launched by ``run_ranks``
with ``NODE_RANK`` 0/1 and ``LOCAL_RANK`` 0/1 over loopback. Two fits share the process group:

1. LSGDStrategy with its defaults for groups (``group_size=None``: one group per node) and for the global period
   (``global_period=None``: every 2nd sync), pulls 0.5 / 0.5, period 2, 8 steps;
2. LocalSGDStrategy, period 2, 6 steps.

Every rank records its flat parameters right before and after each sync (a subclass hook, as ``lsgd_runs.py``) and
what the trainer / strategy saw of the topology. Training losses are offset per rank (gradients unchanged) so the
leaders are known: group {0, 1} → rank 1, group {2, 3} → rank 3, global → rank 3.
"""

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from _common import TinyModel, rank, recording

import lightning_opt  # noqa: F401
from lightning_opt.strategies import LocalSGDStrategy, LSGDStrategy

out = Path(sys.argv[1])
OFFSETS = [30.0, 10.0, 20.0, 0.0]  # wide margins: raw losses of TinyModel are far below 10


class OffsetModel(TinyModel):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + OFFSETS[self.global_rank]



def fit(strategy, max_steps):
    t = pl.Trainer(accelerator="cpu", num_nodes=2, devices=2, strategy=strategy, max_steps=max_steps,
                   use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    t.fit(OffsetModel(bn=False))
    return t


lsgd = recording(LSGDStrategy)(period=2, pull=0.5, global_pull=0.5, leader_window=2, timeout=60)
t = fit(lsgd, 8)
result = {
    "topology": {"world_size": t.world_size, "num_nodes": t.num_nodes, "node_rank": t.node_rank,
                 "local_rank": t.local_rank, "global_rank": t.global_rank, "num_processes": lsgd.num_processes},
    "lsgd": {"pre": torch.stack(lsgd.pre), "post": torch.stack(lsgd.post), "history": lsgd.history,
             "groups": lsgd._groups, "global_every": lsgd._global_every()},
}
local = recording(LocalSGDStrategy)(period=2, timeout=60)
fit(local, 6)
result["local_sgd"] = {"pre": torch.stack(local.pre), "post": torch.stack(local.post)}
torch.save(result, out / f"rank{rank()}.pt")
