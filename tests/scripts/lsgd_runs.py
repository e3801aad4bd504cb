"""Rank script for LSGDStrategy: records every rank's parameters right before and after each sync.

argv: out_dir scenario pull global_pull group_size global_period offsets(comma list)
Training losses are offset per rank by a constant (the gradients are unchanged), so the leader is known.
"""

import sys
from pathlib import Path

import torch
from _common import WORLD_SIZE, TinyModel, rank, recording, trainer

import lightning_opt  # noqa: F401
from lightning_opt.strategies import LSGDStrategy

out, scenario = Path(sys.argv[1]), sys.argv[2]
pull, global_pull = float(sys.argv[3]), float(sys.argv[4])
group_size = None if sys.argv[5] == "none" else int(sys.argv[5])
global_period = None if sys.argv[6] == "none" else int(sys.argv[6])
offsets = [float(v) for v in sys.argv[7].split(",")]


class OffsetModel(TinyModel):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + offsets[self.global_rank]


s = recording(LSGDStrategy)(period=2, pull=pull, global_pull=global_pull, group_size=group_size,
                            global_period=global_period, leader_window=2, timeout=60)
model = OffsetModel(bn=False)
trainer(s, max_steps=8).fit(model)
torch.save({"pre": torch.stack(s.pre), "post": torch.stack(s.post), "history": s.history, "world": WORLD_SIZE},
           out / f"rank{rank()}.pt")
