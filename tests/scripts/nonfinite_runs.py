"""Rank script for the NaN/Inf matrix: non-finite values injected on rank 1 only, under one strategy and several
optimizers / injection kinds / policies, one ``fit`` each (the process group is reused across fits).

argv: out_dir strategy spec [spec ...]
strategy: local_sgd | diloco | lsgd | lookahead_sync | lookahead_local   (period 4: syncs after steps 4, 8)
spec: ``<opt>-<inject>-<policy>``
    opt: sgdm | adam (torch, no protection) | clipped | acclip (``nonfinite="skip"``) | clipped_raise |
         acclip_raise (``nonfinite="raise"``)
    inject: ``grad`` (rank 1's step-6 loss is multiplied by +inf: non-finite gradients), ``wgrad`` (the same
         inside ``warmup_steps=6``, where gradients are averaged every step) or ``param`` (a NaN written into
         rank 1's first weight after step 5)
    policy: the strategy's ``nonfinite`` ("raise" | "drop")
Exceptions are caught and recorded. A spec after which the ranks no longer agree on the next collective (one rank
raised alone) must be the last one: this rank then saves and exits, so its peer's pending collective fails fast.

Recorded per spec, for the test to check by value: every step's parameters and BatchNorm running mean; every
sync's flat parameters and float buffers right before (``pre``, ``pre_buf``) and after it (``post``,
``post_buf``) and how many parameters still have optimizer state after it (``post_state``); every step's local
gradient (after backward, before any averaging: ``local_grads``) and the gradient the optimizer stepped with
(``used_grads``); the initial weights ``x0``.
"""

import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from _common import Recorder, TinyModel, flat_params, rank, recording, trainer

import lightning_opt
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
        if (self.inject in ("grad", "wgrad") and self.global_rank == BAD_RANK
                and self.trainer.global_step == INJECT_STEP - 1):
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


def flat_grads(module):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).clone()
                      for p in module.parameters()])


class GradRecorder(pl.Callback):
    """This rank's own gradient (``on_after_backward`` runs inside the closure, before the strategy averages) and
    the one the optimizer steps with (``on_before_optimizer_step``, after the average)."""

    def __init__(self):
        self.local, self.used = [], []

    def on_after_backward(self, trainer, pl_module):
        self.local.append(flat_grads(pl_module))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.used.append(flat_grads(pl_module))


def float_buffers(module):
    return torch.cat([b.detach().reshape(-1).clone() for b in module.buffers() if b.is_floating_point()])


def recorded(cls):
    """``recording(cls)`` (flat parameters before / after every sync) plus the float buffers before / after and
    the number of parameters with optimizer state after."""

    class Recorded(recording(cls)):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.pre_buf, self.post_buf, self.post_state = [], [], []

        def _sync(self, idx, step):
            self.pre_buf.append(float_buffers(self.lightning_module))
            super()._sync(idx, step)
            self.post_buf.append(float_buffers(self.lightning_module))
            self.post_state.append(sum(len(s) > 0 for opt in self.optimizers for s in opt.state.values()))

    return Recorded


def make_strategy(policy, inject):
    kw = {"period": 4, "nonfinite": policy, "timeout": 60}
    if inject == "wgrad":
        kw["warmup_steps"] = INJECT_STEP
    if strategy_name == "local_sgd":
        return recorded(LocalSGDStrategy)(**kw)
    if strategy_name == "diloco":
        return recorded(LocalSGDStrategy)(outer_lr=0.7, outer_momentum=0.9, outer_nesterov=True, **kw)
    if strategy_name == "lsgd":
        return recorded(LSGDStrategy)(pull=0.25, leader_window=3, **kw)
    if strategy_name.startswith("lookahead_"):
        return recorded(LookaheadStrategy)(alpha=0.3, mode=strategy_name.split("_")[1], **kw)
    raise ValueError(strategy_name)


def state_finite(opt):
    return all(bool(torch.isfinite(v).all()) for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())


def stacked(tensors):
    return torch.stack(tensors) if tensors else torch.zeros(0)


results = {"lightning_opt_file": lightning_opt.__file__}
for spec in specs:
    opt, inject, policy = spec.split("-")
    model, rec, grads = NaNModel(opt, inject), Recorder(), GradRecorder()
    x0 = flat_params(model)
    strategy = make_strategy(policy, inject)
    t = trainer(strategy, max_steps=MAX_STEPS, callbacks=[PoisonParams(), rec, grads])
    res = {"error": None, "error_type": None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            t.fit(model)
        except Exception as err:  # recorded for the test to judge
            res["error"], res["error_type"] = str(err), type(err).__name__
    optimizer = t.optimizers[0] if t.optimizers else None
    res.update(
        params=stacked(rec.params),
        bn=stacked(rec.bn),
        x0=x0,
        pre=stacked(strategy.pre), post=stacked(strategy.post),
        pre_buf=stacked(strategy.pre_buf), post_buf=stacked(strategy.post_buf), post_state=strategy.post_state,
        local_grads=stacked(grads.local), used_grads=stacked(grads.used),
        final_finite=all(bool(torch.isfinite(x).all()) for x in list(model.parameters()) + list(model.buffers())
                         if x.is_floating_point()),
        opt_state_finite=None if optimizer is None else state_finite(optimizer),
        nonfinite_steps=getattr(optimizer, "nonfinite_steps", None),
        history=list(getattr(strategy, "history", [])),
        warnings=[str(w.message) for w in caught],
    )
    results[spec] = res
    torch.save(results, out / f"{strategy_name}_rank{rank()}.pt")  # saved after every spec, for terminal ones
