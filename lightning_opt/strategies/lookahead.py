"""Lookahead synchronisation: slow and fast weights over DDP (sync mode) or as a multi-agent method (local mode)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from lightning_opt._validation import check_choice, check_float, invalid
from lightning_opt.distributed import broadcast_flat
from lightning_opt.strategies.local_sgd import LocalSGDStrategy
from lightning_opt.strategies.schedules import PeriodSchedule

_SLOW_MOMENTUM = "lookahead_slow_momentum"


class LookaheadStrategy(LocalSGDStrategy):
    r"""Lookahead (Zhang et al. 2019; curvature paper Alg. 1; Lookahead-convergence paper Alg. 1).

    The fast weights x take ``period`` (k) base-optimizer steps from the slow weights z, then

    .. math:: z \leftarrow z + \alpha(\bar x - z), \qquad x \leftarrow z.

    * ``mode="sync"``: gradients are all-reduced every step, so the fast weights are identical on every rank and
      :math:`\bar x = x` (no extra communication at a sync). With ``devices=1`` this is classic Lookahead.
    * ``mode="local"``: no per-step communication; :math:`\bar x = \frac1N\sum_i x_i` (the multi-agent extension
      the convergence paper points to). This *is* Local SGD with outer lr α, and the code is shared with
      :class:`LocalSGDStrategy` (the slow weights are its fp32 anchor).

    The slow weights start at the initial weights :math:`x_0` (or the weights at the end of ``warmup_steps``), as in
    the papers' Alg. 1. (timm's ``Lookahead`` creates its slow copy lazily at the first sync, so its first slow
    update is a no-op; ours is not.) ``period`` accepts a schedule: ``ConstantHorizon(s)`` keeps γk = s as the lr
    decays (curvature paper Alg. 3 / Cor. 5.7); the paper bounds the horizon by the negative curvature,
    γk < 1/((1 − α)L⁻), which ``CurvatureAdaptivePeriod`` follows (see :attr:`horizon_factor`).

    ``pullback_momentum`` handles the inner optimizer's first moment (``momentum_keys`` in its state, by default
    SGD's ``momentum_buffer`` and Adam's ``exp_avg``) at a sync: ``"none"`` leaves it, ``"reset"`` zeroes it,
    ``"pullback"`` interpolates it like the weights, :math:`m_x \leftarrow \alpha m_x + (1-\alpha) m_z`,
    :math:`m_z \leftarrow m_x`, where :math:`m_z` (the momentum at the last sync) lives in the optimizer state so it
    is checkpointed per rank.

    Evaluation, ``fit``'s final weights and saved ``state_dict`` use the slow weights; training continues from the
    fast weights. Exact resume covers slow weights, counters and inner optimizer state.

    ``mode="local"`` also streams like Local SGD (``fragments``, ``overlap_steps``, ``merge_mix``, ``comm_dtype``:
    see :class:`LocalSGDStrategy`; Streaming DiLoCo, Douillard et al. 2025), with outer lr α and no momentum.

    Other arguments (``warmup_steps``, ``average_buffers``, ``nonfinite``, ``bucket_cap_mb``, ``timeout``,
    ``start_method``, Lightning's ``DDPStrategy`` arguments): see
    :class:`~lightning_opt.strategies.periodic.PeriodicSyncStrategy`.
    """

    strategy_name = "lookahead"
    _outer_optimizer_rule = "None (the outer step is alpha's: z ← z + α(x̄ − z))"

    def __init__(
        self,
        period: int | PeriodSchedule = 5,
        alpha: float = 0.5,
        mode: str = "sync",
        pullback_momentum: str = "none",
        momentum_keys: tuple[str, ...] = ("momentum_buffer", "exp_avg"),
        **kwargs: Any,
    ) -> None:
        self.alpha = check_float("alpha", alpha, 0.0, 1.0, low_open=True)
        self.mode = check_choice("mode", mode, ("sync", "local"))
        self.pullback_momentum = check_choice("pullback_momentum", pullback_momentum, ("none", "reset", "pullback"))
        if isinstance(momentum_keys, str):
            momentum_keys = (momentum_keys,)
        if not momentum_keys or not all(isinstance(k, str) and k for k in momentum_keys):
            raise invalid("momentum_keys", momentum_keys, "a non-empty sequence of non-empty optimizer state keys")
        self.momentum_keys = tuple(momentum_keys)
        super().__init__(period=period, outer_lr=alpha, **kwargs)
        self.average_gradients_every_step = self.mode == "sync"
        if self.streams and self.mode != "local":
            raise invalid("mode", mode, "'local' with fragments, overlap_steps, merge_mix or comm_dtype (mode 'sync' "
                          "sends gradients every step, not outer gradients)")
        if self.streams and self.pullback_momentum != "none":
            raise invalid("pullback_momentum", pullback_momentum,
                          "'none' with fragments, overlap_steps, merge_mix or comm_dtype")

    @property
    def uses_outer(self) -> bool:
        return True  # the slow weights are the anchor, whatever α is

    @property
    def horizon_factor(self) -> float:
        """h in ``CurvatureAdaptivePeriod``'s τ = c/(γ h L⁻): 1 − α where this is single-agent Lookahead (curvature
        paper Cor. 5.4: s < 1/((1 − α)L⁻)), else 1 (Local SGD's Thm 6.7, the smaller bound)."""
        return 1.0 - self.alpha if self.mode == "sync" or self.world == 1 else 1.0

    def _sync(self, idx: int, step: int) -> None:
        params = self._opt_params(idx)
        if self.mode == "local":
            fast = self._world_mean(params, "parameters", step)
        else:
            self._agree_finite(params, step)
            fast = [p.detach() for p in params]
        slow = self._outer_step(idx, fast)
        with torch.no_grad():
            torch._foreach_copy_(params, slow)
        self._handle_momentum(idx)
        if idx == 0 and self.mode == "local":
            self._average_buffers_now(step)

    def _agree_finite(self, params: list[Tensor], step: int) -> None:
        """Sync mode keeps the fast weights identical, so a sync needs no parameter collective; agreeing on the
        non-finite flags alone (``total=False``) still makes every rank take the same decision: ``raise`` names the
        ranks on all of them (the slow weights are left untouched), ``drop`` copies the first healthy rank's
        weights (and buffers) over the bad ranks."""
        agreement = self._agree(params, "fast weights", step, total=False)
        if not agreement.bad:
            return
        source = agreement.first_healthy
        if agreement.local_bad:
            warnings.warn(f"rank {self.rank}: non-finite fast weights at optimizer step {step}; reset to rank "
                          f"{source}'s weights and optimizer state", stacklevel=2)
        # Same optimizer, same steps: the state has the same layout on every rank, so it can be broadcast too,
        # which keeps the ranks identical afterwards.
        state = [t for opt in self.optimizers for p in self._all_params(opt)
                 for _, t in sorted(opt.state.get(p, {}).items()) if isinstance(t, Tensor) and t.numel() > 0]
        broadcast_flat(list(params) + list(self.lightning_module.buffers()) + state, src=source, meter=self.meter)

    @staticmethod
    def _all_params(opt: Any) -> list[Tensor]:
        return [p for group in opt.param_groups for p in group["params"]]

    def _handle_momentum(self, idx: int) -> None:
        if self.pullback_momentum == "none":
            return
        opt = self.optimizers[idx]
        for p in self._opt_params(idx):
            state = opt.state.get(p, {})
            for key in self.momentum_keys:
                m = state.get(key)
                if not isinstance(m, Tensor):
                    continue
                if self.pullback_momentum == "reset":
                    m.zero_()
                    continue
                slow_m = state.setdefault(_SLOW_MOMENTUM + ":" + key, torch.zeros_like(m))
                m.mul_(self.alpha).add_(slow_m, alpha=1.0 - self.alpha)
                slow_m.copy_(m)

    def __repr__(self) -> str:
        return (f"LookaheadStrategy(period={self.schedule!r}, alpha={self.alpha}, mode={self.mode!r}, "
                f"pullback_momentum={self.pullback_momentum!r}{self._stream_repr()})")
