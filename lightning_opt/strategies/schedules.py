"""Period schedules: how many optimizer steps until the next synchronisation.

A schedule is asked once per sync (and once when local training starts) for the next period τ. Strategies accept
either an ``int`` (wrapped in :class:`ConstantPeriod`) or a :class:`PeriodSchedule`.
"""

from __future__ import annotations

from typing import Any

from lightning_opt._ownership import RankLocal
from lightning_opt._validation import check_float, check_int, invalid


class PeriodSchedule(RankLocal):
    """Base class. Subclasses implement :meth:`next_period`; stateful ones also override the state methods.

    ``trainer`` is the Lightning trainer when one is attached (``None`` otherwise): it is how a schedule reads
    what a callback published, e.g. ``trainer.lightning_opt_curvature`` set by ``SharpnessMonitor``.
    """

    def next_period(self, step: int, lr: float, trainer: Any = None) -> int:
        """The period τ ≥ 1 that starts after optimizer step ``step`` (1-based count), at learning rate ``lr``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class ConstantPeriod(PeriodSchedule):
    """τ fixed (Local SGD, Alg. 2 of the curvature paper; ``PeriodicModelAverager``'s ``period``)."""

    def __init__(self, period: int) -> None:
        check_int("period", period, 1)
        self.period = period

    def next_period(self, step: int, lr: float, trainer: Any = None) -> int:
        return self.period

    def __repr__(self) -> str:
        return f"ConstantPeriod({self.period})"


class ConstantHorizon(PeriodSchedule):
    """Keep the horizon s = γ_t τ_t constant: τ_t = max(1, round(horizon / lr_t)), re-evaluated at each sync.

    Source: curvature paper, Alg. 3 and Cor. 5.7 (variable inner length; its App. I grows τ 5× each time the lr
    drops 5×). ``max_period`` caps τ when the lr becomes tiny.
    """

    def __init__(self, horizon: float, max_period: int = 10_000) -> None:
        check_float("horizon", horizon, 0.0, low_open=True)
        check_int("max_period", max_period, 1)
        self.horizon = float(horizon)
        self.max_period = max_period

    def next_period(self, step: int, lr: float, trainer: Any = None) -> int:
        if not lr > 0:
            return self.max_period
        return int(min(self.max_period, max(1, round(self.horizon / lr))))

    def __repr__(self) -> str:
        return f"ConstantHorizon(horizon={self.horizon}, max_period={self.max_period})"


def as_schedule(period: int | PeriodSchedule) -> PeriodSchedule:
    """Accept an ``int`` or a schedule; raise ``ValueError`` naming ``period`` otherwise."""
    if isinstance(period, PeriodSchedule):
        return period
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise invalid("period", period, "an int with period >= 1, or a PeriodSchedule")
    return ConstantPeriod(period)
