"""Rank script for the NaN/Inf matrix: non-finite values injected on rank 1 only, under one strategy and several
optimizers / injection kinds / policies, one ``fit`` each (the process group is reused across fits).

argv: out_dir strategy spec [spec ...]
strategy: local_sgd | diloco | lsgd | lookahead_sync | lookahead_local   (period 4: syncs after steps 4, 8)
spec: ``<opt>-<inject>-<policy>``
    opt: sgdm | adam (torch, no protection) | clipped | acclip (``nonfinite="skip"``) | clipped_raise |
         acclip_raise (``nonfinite="raise"``)
    inject: ``grad`` (rank 1's step-6 loss is multiplied by +inf: non-finite gradients) or ``param`` (a NaN
         written into rank 1's first weight after step 5)
    policy: the strategy's ``nonfinite`` ("raise" | "drop")
Exceptions are caught and recorded. A spec after which the ranks no longer agree on the next collective (one rank
raised alone) must be the last one: this rank then saves and exits, so its peer's pending collective fails fast.
"""

import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from _common import Recorder, TinyModel, rank, trainer

import lightning_opt  # noqa: F401
from lightning_opt.optim import ACClip, ClippedSGD
from lightning_opt.strategies import LocalSGDStrategy, LookaheadStrategy, LSGDStrategy

out, strategy_name, specs = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
BAD_RANK, INJECT_STEP, MAX_STEPS = 1, 6, 10


class NaNModel(TinyModel):
    def __init__(self, opt, inject):
        super().__init__(opt=opt)
        self.inject = inject

    def training_step(self, batch, batch_idx):
        # rank 0's loss is offset by +5 (gradients unchanged), so the healthy-looking leader of LSGD is rank 1
        loss = super().training_step(batch, batch_idx) + (5.0 if self.global_rank == 0 else 0.0)
        if self.inject == "grad" and self.global_rank == BAD_RANK and self.trainer.global_step == INJECT_STEP - 1:
            loss = loss * float("inf")
        return loss

    def configure_optimizers(self):
        params = self.parameters()
        policy = "raise" if self.opt.endswith("_raise") else "skip"
        if self.opt == "sgdm":
            return torch.optim.SGD(params, lr=0.05, momentum=0.9)
        if self.opt == "adam":
            return torch.optim.Adam(params, lr=0.01)
        if self.opt.startswith("clipped"):
            return ClippedSGD(params, lr=0.05, max_norm=0.5, momentum=0.9, nonfinite=policy)
        if self.opt.startswith("acclip"):
            return ACClip(params, lr=0.01, nonfinite=policy)
        raise ValueError(self.opt)


class PoisonParams(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.inject == "param" and trainer.global_rank == BAD_RANK and trainer.global_step == INJECT_STEP - 1:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


def make_strategy(policy):
    kw = {"period": 4, "nonfinite": policy, "timeout": 60}
    if strategy_name == "local_sgd":
        return LocalSGDStrategy(**kw)
    if strategy_name == "diloco":
        return LocalSGDStrategy(outer_lr=0.7, outer_momentum=0.9, outer_nesterov=True, **kw)
    if strategy_name == "lsgd":
        return LSGDStrategy(pull=0.5, leader_window=3, **kw)
    if strategy_name.startswith("lookahead_"):
        return LookaheadStrategy(alpha=0.5, mode=strategy_name.split("_")[1], **kw)
    raise ValueError(strategy_name)


def state_finite(opt):
    return all(bool(torch.isfinite(v).all()) for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())


results = {}
for spec in specs:
    opt, inject, policy = spec.split("-")
    model, rec = NaNModel(opt, inject), Recorder()
    strategy = make_strategy(policy)
    t = trainer(strategy, max_steps=MAX_STEPS, callbacks=[PoisonParams(), rec])
    res = {"error": None, "error_type": None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            t.fit(model)
        except Exception as err:  # recorded for the test to judge
            res["error"], res["error_type"] = str(err), type(err).__name__
    optimizer = t.optimizers[0] if t.optimizers else None
    res.update(
        params=torch.stack(rec.params) if rec.params else torch.zeros(0),
        bn=torch.stack(rec.bn) if rec.bn else torch.zeros(0),
        final_finite=all(bool(torch.isfinite(x).all()) for x in list(model.parameters()) + list(model.buffers())
                         if x.is_floating_point()),
        opt_state_finite=None if optimizer is None else state_finite(optimizer),
        nonfinite_steps=getattr(optimizer, "nonfinite_steps", None),
        history=list(getattr(strategy, "history", [])),
        warnings=[str(w.message) for w in caught],
    )
    results[spec] = res
    torch.save(results, out / f"{strategy_name}_rank{rank()}.pt")  # saved after every spec, for terminal ones
