"""EASGD: elastic averaging SGD (synchronous form), a baseline for LSGD."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_opt._tensors import accumulation_copy, accumulation_dtype
from lightning_opt._validation import check_float
from lightning_opt.distributed import is_dist
from lightning_opt.strategies._averaging import realign
from lightning_opt.strategies.periodic import PeriodicSyncStrategy
from lightning_opt.strategies.schedules import PeriodSchedule


class EASGDStrategy(PeriodicSyncStrategy):
    r"""Elastic averaging SGD, synchronous form (Zhang, Choromanska & LeCun, "Deep learning with elastic averaging
    SGD", NIPS 2015, §3: synchronous EASGD with α = ηρ and β = pα; the elastic step every τ steps as in their
    Alg. 1). The same update, written for EAGD, is in the LSGD seed (Teng et al. 2019, Suppl. §8):
    :math:`\tilde X_+ = (1 - p\eta\lambda)\tilde X + p\eta\lambda \cdot \frac1p\sum_i X^i`.

    Each of N workers takes ``period`` (τ) local optimizer steps; then, with the elastic coefficient
    :math:`\alpha = \beta / N` (β the *moving rate*) and the centre variable :math:`\tilde x` shared by all ranks,

    .. math:: x_i \leftarrow x_i - \alpha (x_i - \tilde x), \qquad
              \tilde x \leftarrow \tilde x + \alpha \sum_{i=1}^{N} (x_i - \tilde x),

    both right-hand sides using the pre-update :math:`x_i` and :math:`\tilde x`. The centre therefore moves a
    fraction β of the way to the workers' mean, :math:`\tilde x \leftarrow (1-\beta)\tilde x + \beta \bar x`.
    The default β = 0.43 is the EASGD paper's setting, also used for the EASGD baselines of the LSGD paper
    (§4 and Suppl. Table 2). The EASGD objective's stationary points need not be stationary points of f (LSGD
    paper, Prop. 8) — the reason :class:`~lightning_opt.strategies.lsgd.LSGDStrategy` exists; see
    ``examples/reproductions/matrix_completion.py`` for the LSGD paper's Fig. 1 comparison.

    Communication per sync: one all-reduce of the workers' parameters (flat buckets) plus the tiny non-finite
    flag vector. The centre is kept in fp32 (or the parameter dtype if wider), is identical on every rank (all
    ranks apply the same update to the same summed values), and is saved once in the checkpoint. It starts at the
    workers' mean at the first post-warmup step (which is :math:`x_0`, since all ranks start from rank 0's weights,
    or the weights at the end of ``warmup_steps``). Floating-point buffers are not elastic: they are averaged at
    each sync (if ``average_buffers``), integer buffers taken from rank 0.

    Evaluation, ``fit``'s final weights and saved ``state_dict`` use the centre :math:`\tilde x` (buffers: their
    world mean); training continues from the local weights. Exact resume covers the centre, counters and every
    rank's weights and optimizer state.

    Args:
        period: optimizer steps between elastic updates (int ≥ 1) or a
            :class:`~lightning_opt.strategies.schedules.PeriodSchedule`.
        beta: moving rate β ∈ (0, 1]; the elastic coefficient is α = β / N for world size N.
        **kwargs: ``warmup_steps``, ``average_buffers`` (float buffers averaged at a sync), ``nonfinite``
            (``"raise"``: the centre is left untouched; ``"drop"``: such ranks are left out of the centre update,
            reset to the (updated) centre and their optimizer state is cleared), ``bucket_cap_mb``, ``timeout``,
            ``start_method`` and Lightning's ``DDPStrategy`` arguments: see
            :class:`~lightning_opt.strategies.periodic.PeriodicSyncStrategy`.
    """

    strategy_name = "easgd"
    _shared_state = {"center": "_center"}  # fp32 centre per optimizer, identical on every rank
    # Unlike averaging, an elastic sync leaves the workers apart from the centre: evaluation and checkpoints must
    # swap the centre in.
    _sync_reaches_consensus = False

    def __init__(self, period: int | PeriodSchedule = 1, beta: float = 0.43, **kwargs: Any) -> None:
        self.beta = check_float("beta", beta, 0.0, 1.0, low_open=True)
        super().__init__(period=period, **kwargs)
        self._center: dict[int, list[Tensor]] = {}
        self.last_center_step_norm: float | None = None

    @property
    def alpha(self) -> float:
        """The elastic coefficient α = β / N (N the current world size)."""
        return self.beta / self.world

    # ------------------------------------------------------------------ centre
    def _before_local_step(self, idx: int, step: int) -> None:
        if idx not in self._center:
            # A collective, reached by every rank at the same step; equal to x_0 when ranks start identical.
            params = self._opt_params(idx)
            means = self._world_mean(params, "parameters", step)
            self._center[idx] = [m.to(accumulation_dtype(p.dtype)).clone() for m, p in zip(means, params)]

    def _params_changed(self, idx: int, old: list[Tensor], new: list[Tensor]) -> None:
        # A parameter that joins mid-fit (frozen until then, so identical on every rank) is its own centre.
        if idx in self._center:
            self._center[idx] = realign(self._center[idx], old, new, accumulation_copy)

    # ------------------------------------------------------------------ sync
    def _sync(self, idx: int, step: int) -> None:
        params = self._opt_params(idx)
        center = self._center[idx]
        x = [p.detach().to(c.dtype) for p, c in zip(params, center)]
        alpha = self.alpha
        if is_dist():
            agreement = self._average(params, "parameters", step)
            sums = [torch.empty_like(c) for c in center]
            agreement.write(sums, mean=False)
            good, local_bad = agreement.healthy, agreement.local_bad
        else:
            good, sums, local_bad = 1, [t.clone() for t in x], False
        # Σ_i (x_i − x̃) over the contributing ranks, with the pre-update centre
        center_move = torch._foreach_sub(sums, torch._foreach_mul(center, float(good)))
        torch._foreach_mul_(center_move, alpha)
        new_x = None
        if not local_bad:
            # x_i ← x_i − α (x_i − x̃)
            new_x = torch._foreach_add(x, torch._foreach_sub(x, center), alpha=-alpha)
        # x̃ ← x̃ + α Σ_i (x_i − x̃)
        torch._foreach_add_(center, center_move)
        with torch.no_grad():
            torch._foreach_copy_(params, center if new_x is None else new_x)
        if idx == 0:
            self._average_buffers_now(step)
            self._log_sync(step, center_move)

    def _log_sync(self, step: int, center_move: list[Tensor]) -> None:
        self.last_center_step_norm = float(torch.stack(torch._foreach_norm(center_move)).norm())
        self._log_metrics({"easgd/center_step_norm": self.last_center_step_norm, **self.comm_stats})

    # ------------------------------------------------------------------ consensus
    def _consensus(self) -> list[Tensor]:
        """The centre for the parameters it covers; float buffers: world mean; integer buffers: local."""
        by_id = {id(p): c for idx, centers in self._center.items()
                 for p, c in zip(self._opt_params(idx), centers)}
        tensors = self._module_tensors()
        averaged = self._consensus_ids()
        rest = [t for t in tensors if id(t) not in by_id and t.is_floating_point() and id(t) in averaged]
        means = iter(self._world_mean(rest, "weights", self.clock.steps.get(0, 0)) if rest else [])
        out = []
        for t in tensors:
            if id(t) in by_id:
                out.append(by_id[id(t)].to(t.dtype))
            elif t.is_floating_point() and id(t) in averaged:
                out.append(next(means).to(t.dtype))
            else:
                out.append(t.detach().clone())
        return out

    def __repr__(self) -> str:
        return (f"EASGDStrategy(period={self.schedule!r}, beta={self.beta}, warmup_steps={self.warmup_steps}, "
                f"nonfinite={self.nonfinite!r})")
