"""Local SGD with warmup and an optional outer optimizer (SlowMo / DiLoCo)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_opt._tensors import accumulation_copy, accumulation_dtype
from lightning_opt._validation import check_bool, check_float, invalid
from lightning_opt.distributed import is_dist
from lightning_opt.strategies._averaging import realign
from lightning_opt.strategies.periodic import PeriodicSyncStrategy
from lightning_opt.strategies.schedules import PeriodSchedule


class LocalSGDStrategy(PeriodicSyncStrategy):
    r"""Local SGD: each of N workers takes ``period`` (τ) optimizer steps on its own shard, then
    :math:`z = \frac1N \sum_i x_i` and every worker restarts from z (curvature paper, Alg. 2).

    With an outer optimizer the averaged displacement from the last anchor :math:`a` is a pseudo-gradient
    :math:`\Delta = a - \frac1N\sum_i x_i`, and an outer SGD step is taken on it (SlowMo, Wang et al. 2020;
    DiLoCo, Douillard et al. 2023):

    .. math:: m \leftarrow \mu m + \Delta,\quad d = \Delta + \mu m \text{ (Nesterov) or } m,\quad
              a \leftarrow a - \eta_{out} d,\quad x_i \leftarrow a.

    ``outer_lr=1, outer_momentum=0`` is plain averaging (and takes the exact averaging path). Presets:
    SlowMo ``outer_momentum=0.5`` (outer_lr 1.0); DiLoCo ``outer_lr=0.7, outer_momentum=0.9, outer_nesterov=True``.
    Anchor and momentum are kept in fp32 (or the parameter dtype if wider) and saved in checkpoints.

    Args:
        period: optimizer steps between synchronisations (int ≥ 1) or a
            :class:`~lightning_opt.strategies.schedules.PeriodSchedule` (e.g. ``ConstantHorizon``).
        outer_lr, outer_momentum, outer_nesterov: the outer optimizer on the pseudo-gradient.
        **kwargs: ``warmup_steps``, ``average_buffers``, ``nonfinite`` (``"drop"``: a rank with non-finite
            parameters at a sync is left out of the average and reset to the consensus), ``bucket_cap_mb``,
            ``timeout``, ``start_method`` and Lightning's ``DDPStrategy`` arguments: see
            :class:`~lightning_opt.strategies.periodic.PeriodicSyncStrategy`.

    Evaluation, ``fit``'s final weights and saved ``state_dict`` use the consensus: the current world average
    (plain averaging) or the anchor (with an outer optimizer). Training continues from the local weights.
    """

    strategy_name = "local_sgd"
    _shared_state = {"anchor": "_anchor", "momentum": "_momentum"}  # fp32 anchors and outer momenta per optimizer

    def __init__(self, period: int | PeriodSchedule = 1, *, outer_lr: float = 1.0, outer_momentum: float = 0.0,
                 outer_nesterov: bool = False, **kwargs: Any) -> None:
        self.outer_lr = check_float("outer_lr", outer_lr, 0.0, 100.0, low_open=True)
        self.outer_momentum = check_float("outer_momentum", outer_momentum, 0.0, 1.0, high_open=True)
        self.outer_nesterov = check_bool("outer_nesterov", outer_nesterov)
        if self.outer_nesterov and self.outer_momentum == 0:
            raise invalid("outer_nesterov", True, "False with outer_momentum=0 (Nesterov needs momentum in (0, 1))")
        super().__init__(period=period, **kwargs)
        self._anchor: dict[int, list[Tensor]] = {}
        self._momentum: dict[int, list[Tensor]] = {}

    @property
    def uses_outer(self) -> bool:
        return not (self.outer_lr == 1.0 and self.outer_momentum == 0.0)

    @override
    def _before_local_step(self, idx: int, step: int) -> None:
        # The anchor is where local training starts: the initial (or post-warmup) weights.
        if self.uses_outer and idx not in self._anchor:
            self._anchor[idx] = [accumulation_copy(p) for p in self._opt_params(idx)]

    @override
    def _params_changed(self, idx: int, old: list[Tensor], new: list[Tensor]) -> None:
        # A parameter that joins mid-fit starts its outer step from where it joins, with no momentum.
        if idx in self._anchor:
            self._anchor[idx] = realign(self._anchor[idx], old, new, accumulation_copy)
        if idx in self._momentum:
            self._momentum[idx] = realign(self._momentum[idx], old, new,
                                          lambda p: torch.zeros_like(p, dtype=accumulation_dtype(p.dtype)))

    @override
    def _sync(self, idx: int, step: int) -> None:
        params = self._opt_params(idx)
        if not is_dist() and not self.uses_outer:
            return
        means = self._world_mean(params, "parameters", step)
        new = self._outer_step(idx, means) if self.uses_outer else means
        with torch.no_grad():
            torch._foreach_copy_(params, new)
        if idx == 0:
            self._average_buffers_now(step)

    def _outer_step(self, idx: int, means: list[Tensor]) -> list[Tensor]:
        anchor = self._anchor[idx]
        delta = torch._foreach_sub(anchor, [m.to(a.dtype) for m, a in zip(means, anchor)])
        if self.outer_momentum > 0:
            if idx not in self._momentum:
                self._momentum[idx] = [torch.zeros_like(a) for a in anchor]
            buf = self._momentum[idx]
            torch._foreach_mul_(buf, self.outer_momentum)
            torch._foreach_add_(buf, delta)
            direction = torch._foreach_add(delta, buf, alpha=self.outer_momentum) if self.outer_nesterov else buf
        else:
            direction = delta
        torch._foreach_add_(anchor, direction, alpha=-self.outer_lr)
        return anchor

    @override
    def _consensus(self) -> list[Tensor]:
        values = super()._consensus()
        if not self.uses_outer:
            return values
        by_id = {id(p): a for idx, anchors in self._anchor.items()
                 for p, a in zip(self._opt_params(idx), anchors)}
        return [by_id[id(t)].to(t.dtype) if id(t) in by_id else v for t, v in zip(self._module_tensors(), values)]

    def __repr__(self) -> str:
        return (f"LocalSGDStrategy(period={self.schedule!r}, warmup_steps={self.warmup_steps}, "
                f"outer_lr={self.outer_lr}, outer_momentum={self.outer_momentum}, "
                f"outer_nesterov={self.outer_nesterov})")
