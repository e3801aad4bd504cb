"""Rank script for the resume matrix: for one strategy and several optimizers, train 3 epochs uninterrupted
(checkpoint after every epoch), then resume from the epoch-0 checkpoint (step 6, the middle of the second period
of τ=4) and record both trajectories, final weights, optimizer states and the stateful callbacks' states.

argv: out_dir strategies(comma list) optimizers(comma list)
strategy: local_sgd | diloco | lsgd | lookahead_sync | lookahead_local
optimizer: sgdm | adam | clipped | acclip
Every (strategy, optimizer) pair runs in this one process pair (the process group is reused across fits), which
keeps the matrix cheap: the cost is dominated by process start-up, not by the 30 tiny steps of a pair.
"""

import sys
import traceback
from pathlib import Path

import torch
from _common import Recorder, TinyModel, flat_params, rank, trainer
from pytorch_lightning.callbacks import ModelCheckpoint

import lightning_opt  # noqa: F401
from lightning_opt.callbacks import GradNormMonitor, TimeAverageMonitor
from lightning_opt.optim import ACClip, ClippedSGD
from lightning_opt.strategies import LocalSGDStrategy, LookaheadStrategy, LSGDStrategy

out, strategies, optimizers = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3].split(",")


class MatrixModel(TinyModel):
    def configure_optimizers(self):
        params = self.parameters()
        if self.opt == "sgdm":
            return torch.optim.SGD(params, lr=0.05, momentum=0.9)
        if self.opt == "adam":
            return torch.optim.Adam(params, lr=0.01)
        if self.opt == "clipped":  # a threshold the gradient norm crosses, so both branches of GClip run
            return ClippedSGD(params, lr=0.05, max_norm=0.3, momentum=0.9)
        if self.opt == "acclip":
            return ACClip(params, lr=0.01, weight_decay=1e-4)
        raise ValueError(self.opt)


def make_strategy(strategy_name):
    if strategy_name == "local_sgd":
        return LocalSGDStrategy(period=4, timeout=60)
    if strategy_name == "diloco":
        return LocalSGDStrategy(period=4, outer_lr=0.7, outer_momentum=0.9, outer_nesterov=True, timeout=60)
    if strategy_name == "lsgd":
        return LSGDStrategy(period=4, pull=0.5, leader_window=3, timeout=60)
    if strategy_name in ("lookahead_sync", "lookahead_local"):
        return LookaheadStrategy(period=4, alpha=0.5, mode=strategy_name.split("_")[1],
                                 pullback_momentum="pullback", timeout=60)
    raise ValueError(strategy_name)


def run(strategy_name, opt, max_epochs, ckpt_dir=None, ckpt_path=None):
    model, rec = MatrixModel(opt=opt), Recorder()
    # small cadences so every stateful path runs before and after the checkpoint: gain every 2 steps, windows
    # shorter than a run, logging (an all-gather) every 2 steps
    tam = TimeAverageMonitor(window=4, gain_every=2, gain_window=4, gain_batches=2)
    gnm = GradNormMonitor(every_n_steps=1, per_layer=True)
    cbs = [rec, gnm, tam]
    if ckpt_dir is not None:
        cbs.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1, filename="{epoch}"))
    t = trainer(make_strategy(strategy_name), max_steps=-1, max_epochs=max_epochs, callbacks=cbs, log_every_n_steps=2,
                enable_checkpointing=ckpt_dir is not None)
    t.fit(model, ckpt_path=ckpt_path)
    opt_state = t.optimizers[0].state_dict()
    return {
        "params": torch.stack(rec.params),
        "bn": torch.stack(rec.bn),
        "final": flat_params(model),
        "opt_state": {k: {n: v.clone() for n, v in s.items() if isinstance(v, torch.Tensor)}
                      for k, s in opt_state["state"].items()},
        "opt_extra": opt_state.get("lightning_opt"),
        "tam": tam.state_dict(),
        "steps": dict(t.strategy.clock.steps),
    }


results = {}
for strategy_name in strategies:
    for opt in optimizers:
        ckpt = out / f"ckpt_{strategy_name}_{opt}"
        try:
            full = run(strategy_name, opt, 3, ckpt_dir=ckpt)
            resumed = run(strategy_name, opt, 3, ckpt_path=ckpt / "epoch=0.ckpt")
            results[strategy_name, opt] = {"full": full, "resumed": resumed, "error": None}
        except Exception:  # recorded so the other pairs still report (such errors are symmetric across ranks)
            results[strategy_name, opt] = {"error": traceback.format_exc()}
torch.save(results, out / f"rank{rank()}.pt")
