"""GradNormMonitor: total (and optional per-layer) gradient norm before clipping, mean and max over ranks.

The gradient norm is the second quantity of thesis eq. (6.2) ("Grad norm ‖∇L_S(θ_k)‖"), here measured on the
training minibatch; it is also the quantity the clipping rules of thesis ch. 3–4 (GClip / normalised GD,
Alg. 1) threshold, which is why it is read *after* AMP unscaling and *before* gradient clipping.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from lightning_opt._ownership import RankLocal
from lightning_opt._validation import check_bool, check_float, check_int
from lightning_opt.callbacks._common import log_scalars
from lightning_opt.distributed import all_gather_vector

__all__ = ["GradNormMonitor"]


class GradNormMonitor(RankLocal, Callback):
    """Log the gradient norm every ``every_n_steps`` optimizer steps.

    Hooks ``on_before_optimizer_step``, which Lightning calls after the closure (backward), after the AMP grad
    scaler has unscaled the gradients and before ``gradient_clip_val`` clipping, so the value is the
    pre-clip norm of the gradients the optimizer is about to use. Per logging step there is one fused norm
    computation (``torch._foreach_norm`` over all gradients, then ``torch.linalg.vector_norm`` of the
    stacked norms), at most one all-gather of a short vector across ranks and exactly one host sync;
    non-logging steps cost nothing.

    Logged (``step`` = ``trainer.global_step`` of the optimizer step being taken):

    * ``grad/norm`` — mean over ranks of each rank's total norm; ``grad/norm_max`` — max over ranks. Under
      plain DDP the gradients are already all-reduced, so both equal the norm of the averaged gradient;
      under the periodic-synchronisation strategies gradients are local to each rank and the two differ.
    * ``grad_layer/<parameter name>`` (``per_layer=True``) — per-parameter norm, mean over ranks.
    * ``grad/<key>`` for every entry of the optimizer's ``last_stats`` dict (e.g. post-clip norm, clip
      fraction of the clipping optimizers in ``lightning_opt.optim``), read in ``on_train_batch_end`` (after
      the step) and averaged over ranks.

    With several optimizers (manual optimisation) keys get an ``_opt<i>`` suffix. Metrics are written to every
    logger directly (rank 0), independent of ``Trainer(log_every_n_steps)``, and mirrored into
    ``trainer.callback_metrics``.

    Args:
        every_n_steps: log on optimizer steps whose ``global_step`` is a multiple of this (≥ 1).
        norm_type: p of the p-norm, p > 0 or ``inf``.
        per_layer: also log per-parameter norms.
    """

    def __init__(self, every_n_steps: int = 50, norm_type: float = 2.0, per_layer: bool = False) -> None:
        super().__init__()
        own = "GradNormMonitor"
        self.every_n_steps = check_int("every_n_steps", every_n_steps, 1, owner=own)
        # the inf-norm (max |g|) is a valid choice: the interval is closed at inf
        self.norm_type = check_float("norm_type", norm_type, 0.0, math.inf, low_open=True, high_open=False, owner=own)
        self.per_layer = check_bool("per_layer", per_layer, owner=own)
        # (step, optimizer index, optimizer, layer names, device tensor [total, per-layer...]) awaiting
        # logging
        self._pending: list[tuple[int, int, Any, list[str], Tensor]] = []
        self._names: dict[int, str] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._names = {id(p): n for n, p in pl_module.named_parameters()}

    def _is_log_step(self, trainer: pl.Trainer) -> bool:
        return trainer.global_step % self.every_n_steps == 0

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._is_log_step(trainer):
            return
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad.to_dense() if p.grad.is_sparse else p.grad for p in params]
        norms = torch._foreach_norm(grads, self.norm_type, dtype=torch.float32)
        per = torch.stack([n.to(grads[0].device) for n in norms])
        total = torch.linalg.vector_norm(per, ord=self.norm_type).reshape(1)
        vec = torch.cat([total, per]) if self.per_layer else total
        names = [self._names.get(id(p), f"param{i}") for i, p in enumerate(params)] if self.per_layer else []
        opt_idx = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
        self._pending.append((trainer.global_step, opt_idx, optimizer, names, vec))

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        suffix_needed = len(trainer.optimizers) > 1
        # pack everything of this batch into one vector: one collective and one host sync
        parts: list[Tensor] = []
        layout: list[tuple[int, int, list[str], list[str], int]] = []
        for step, opt_idx, optimizer, names, vec in pending:
            stats = getattr(getattr(optimizer, "_optimizer", optimizer), "last_stats", None)
            stat_keys: list[str] = []
            if isinstance(stats, dict):
                stat_vals = []
                for key, val in stats.items():
                    if isinstance(val, (Tensor, int, float)) and not isinstance(val, bool):
                        stat_keys.append(str(key))
                        stat_vals.append(torch.as_tensor(val, dtype=torch.float32).reshape(()).to(vec.device))
                if stat_vals:
                    vec = torch.cat([vec, torch.stack(stat_vals)])
            parts.append(vec.float())
            layout.append((step, opt_idx, names, stat_keys, vec.numel()))
        flat = torch.cat(parts)
        gathered = all_gather_vector(flat)  # [world, n]
        mean = gathered.mean(0)
        rows = torch.stack([mean, gathered.max(0).values]).cpu().tolist()  # the one host sync
        mean_l, max_l = rows
        offset = 0
        by_step: dict[int, dict[str, float]] = {}
        for step, opt_idx, names, stat_keys, n in layout:
            sfx = f"_opt{opt_idx}" if suffix_needed else ""
            m = by_step.setdefault(step, {})
            m[f"grad/norm{sfx}"] = mean_l[offset]
            m[f"grad/norm_max{sfx}"] = max_l[offset]
            i = offset + 1
            for name in names:
                m[f"grad_layer/{name}{sfx}"] = mean_l[i]
                i += 1
            for key in stat_keys:
                m[f"grad/{key}{sfx}"] = mean_l[i]
                i += 1
            offset += n
        for step, metrics in by_step.items():
            log_scalars(trainer, metrics, step)
