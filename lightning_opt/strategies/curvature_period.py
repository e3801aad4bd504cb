"""Curvature-adaptive synchronisation period for Local SGD / Lookahead.

Seed: curvature paper, Thm 6.7 (Local SGD converges if γL⁺ = O(1) and γτL⁻ = O(1)) and Cor. 5.4 (Lookahead: the
horizon s = γτ may grow up to s < 1/((1 − α)L⁻), independently of the positive curvature). L⁻ is the lower
smoothness, ∇²f ⪰ −L⁻ I, i.e. L⁻ = max(0, −λ_min(∇²f)). Hence the longest safe period at learning rate γ is
τ = c / (γ L⁻) for Local SGD and τ = c / (γ (1 − α) L⁻) for Lookahead.

The only coupling to the callbacks is the documented trainer attribute ``trainer.lightning_opt_curvature``
that :class:`~lightning_opt.callbacks.sharpness.SharpnessMonitor` publishes: ``{"lambda_max": float,
"lambda_min": float, "step": int}`` (identical on every rank).
"""

from __future__ import annotations

import math
from typing import Any

from lightning_opt._validation import check_float, check_int
from lightning_opt.strategies.schedules import PeriodSchedule

CURVATURE_ATTR = "lightning_opt_curvature"


class CurvatureAdaptivePeriod(PeriodSchedule):
    """τ = clamp(⌊c / (lr · h · L⁻)⌋, min_period, max_period) with L⁻ = max(0, −λ_min) from the latest
    ``SharpnessMonitor`` measurement and h the strategy's ``horizon_factor``.

    Curvature paper, Thm 6.7 (Local SGD: γτL⁻ = O(1), h = 1) and Cor. 5.4 (Lookahead: any horizon
    s = γτ < 1/((1 − α)L⁻), h = 1 − α). :class:`LookaheadStrategy` reports h = 1 − α in ``mode="sync"`` or on one
    rank, where it is the corollary's single-agent Lookahead; with α = 1 it is plain SGD and the period is
    ``max_period``. Local SGD, and Lookahead ``mode="local"`` on several ranks (no theorem covers the mix), use
    h = 1, the smaller of the two bounds.

    Args:
        c: the constant in γτL⁻ = c, > 0 (default 0.5).
        min_period: smallest period, ≥ 1.
        max_period: largest period, ≥ ``min_period``; used when L⁻ = 0 (no negative curvature measured) or lr
            = 0.
        default_period: period before the first measurement (and when the published value is not finite);
            default ``min_period`` (synchronise often until the curvature is known).

    The period adapts only as often as the monitor measures: with ``SharpnessMonitor``'s cost-aware default
    schedule the first measurement may come thousands of steps in (``default_period`` until then); pass the
    monitor ``every_n_steps`` (or a larger ``max_overhead``) to adapt earlier.

    The schedule remembers the last measurement it used (``state_dict``), so a resumed run keeps its period
    until the monitor publishes again. It reads the value published on the trainer, which the monitor makes
    identical on every rank, so all ranks choose the same τ.
    """

    def __init__(self, c: float = 0.5, min_period: int = 1, max_period: int = 1000,
                 default_period: int | None = None) -> None:
        self.c = check_float("c", c, 0.0, math.inf, low_open=True, high_open=True)
        self.min_period = check_int("min_period", min_period, 1)
        self.max_period = check_int("max_period", max_period, min_period)
        if default_period is None:
            default_period = min_period
        self.default_period = check_int("default_period", default_period, min_period, max_period)
        self.last_lambda_min: float | None = None
        self.last_measured_step: int | None = None
        self.last_period: int | None = None

    def period_for(self, lr: float, lambda_min: float | None, horizon_factor: float = 1.0) -> int:
        """τ for learning rate ``lr``, minimum Hessian eigenvalue ``lambda_min`` (``None``: default) and the
        strategy's ``horizon_factor`` h ∈ [0, 1] (1 − α for Lookahead, 1 for Local SGD)."""
        if lambda_min is None or not math.isfinite(lambda_min):
            return self.default_period
        denominator = float(lr) * max(0.0, -float(lambda_min)) * float(horizon_factor)
        if not denominator > 0:  # no negative curvature, lr 0, α = 1, or an underflow: no bound
            return self.max_period
        raw = self.c / denominator  # may be inf: clamped below
        tau = self.max_period if raw >= self.max_period else math.floor(raw)
        return int(min(self.max_period, max(self.min_period, tau)))

    def next_period(self, step: int, lr: float, trainer: Any = None) -> int:
        info = getattr(trainer, CURVATURE_ATTR, None) if trainer is not None else None
        if isinstance(info, dict) and info.get("lambda_min") is not None:
            lam = float(info["lambda_min"])
            if math.isfinite(lam):
                self.last_lambda_min = lam
                self.last_measured_step = int(info.get("step", -1))
        factor = getattr(getattr(trainer, "strategy", None), "horizon_factor", 1.0)
        self.last_period = self.period_for(lr, self.last_lambda_min, factor)
        return self.last_period

    def state_dict(self) -> dict[str, Any]:
        return {"last_lambda_min": self.last_lambda_min, "last_measured_step": self.last_measured_step,
                "last_period": self.last_period}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_lambda_min = state.get("last_lambda_min")
        self.last_measured_step = state.get("last_measured_step")
        self.last_period = state.get("last_period")

    def __repr__(self) -> str:
        return (f"CurvatureAdaptivePeriod(c={self.c}, min_period={self.min_period}, "
                f"max_period={self.max_period}, "
                f"default_period={self.default_period})")
