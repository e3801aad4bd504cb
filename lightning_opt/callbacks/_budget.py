"""Time accounting for expensive monitors: the share of fit time spent inside them, and when the next
measurement becomes affordable under a budget (``max_overhead``).

With S the seconds spent in measurements so far, T the fit's wall time so far (S included), C the expected
cost of the next measurement and b the budget, the next measurement may start once S + C ≤ b·(T + C): right
after it ends the share S/T is at most b, and it only falls until the one after. It also waits at least the
training time C·(1 − b)/b that one measurement needs at share b, so slack left by an overestimated cost is not
spent in a burst of back-to-back measurements. The wait is converted into
optimizer steps with the mean step time since the last :meth:`OverheadBudget.mark` (measurements excluded; the
owner marks after the slow first steps of a fit and at every plan, so the estimate follows recent steps), so the
decision is a step number that every rank can agree on in advance (no collective per step).

When the fit's last step is known, :meth:`OverheadBudget.room` forecasts instead: the seconds of measurements the
whole fit affords, S + X ≤ b·(T + R + X) with R the remaining steps at that step time (the owner spreads them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any


class OverheadBudget:
    """Accounts the seconds a monitor spends against the fit's wall time and plans affordable steps.

    Args:
        fraction: the budget b in (0, 1) (validated by the owner).
        clock: seconds counter (injectable for tests).
    """

    def __init__(self, fraction: float, clock: Callable[[], float] = time.perf_counter) -> None:
        self.fraction = fraction
        self.clock = clock
        self.spent = 0.0  # seconds inside measurements, over all fit calls
        self.elapsed_before = 0.0  # fit seconds of earlier fit calls (restored from checkpoints)
        self.next_step: int | None = None  # planned measurement step; None = not planned yet
        self._t0: float | None = None
        self._mark: tuple[float, int, float] | None = None  # (clock, step, spent) where step_time starts

    def start(self, step: int) -> None:
        """Start the clock of a fit call (``on_train_start``) at optimizer step ``step``."""
        self._t0 = self.clock()
        self.mark(step)

    def mark(self, step: int) -> None:
        """Measure the step time from here on (e.g. after a fit's slow first steps)."""
        self._mark = (self.clock(), step, self.spent)

    def reset(self) -> None:
        """Forget everything (a new run)."""
        self.spent, self.elapsed_before, self.next_step = 0.0, 0.0, None
        self._t0 = self._mark = None

    def stop(self) -> None:
        """Stop the clock at the end of a fit call (a later fit continues the accounting)."""
        self.elapsed_before = self.elapsed()
        self._t0 = self._mark = None

    def charge(self, seconds: float) -> None:
        self.spent += max(0.0, seconds)

    def elapsed(self) -> float:
        """Fit wall time so far (earlier fit calls included), measurements included."""
        return self.elapsed_before + (0.0 if self._t0 is None else self.clock() - self._t0)

    def share(self) -> float:
        """Seconds spent / fit seconds (0 before any time has passed)."""
        total = self.elapsed()
        return self.spent / total if total > 0 else 0.0

    def step_time(self, step: int) -> float:
        """Mean seconds per optimizer step since the last mark, measurements excluded (nan before a step)."""
        if self._mark is None or step <= self._mark[1]:
            return math.nan
        t, s, spent = self._mark
        training = (self.clock() - t) - (self.spent - spent)
        return max(training, 0.0) / (step - s)

    def steps_until_affordable(self, step: int, cost: float) -> int:
        """Optimizer steps from ``step`` until a measurement of ``cost`` seconds fits the budget (≥ 1)."""
        b = self.fraction
        wait = max((self.spent + cost) / b - cost - self.elapsed(), cost * (1 - b) / b)
        per_step = self.step_time(step)
        if wait <= 0:
            return 1
        if not per_step > 0:  # no timing yet (or a zero-cost step): wait at least one step
            return 1
        return max(1, math.ceil(wait / per_step))

    def room(self, step: int, end: int) -> float:
        """Seconds of measurements still affordable if the fit runs from optimizer step ``step`` to ``end``: the
        largest X with S + X ≤ b·(T + R + X), R = (end − step) steps at :meth:`step_time` (0 before a step), i.e.
        the share of the forecast fit time (training, measurements X and all) stays within b. Negative when the
        budget is overspent."""
        per_step = self.step_time(step)
        remaining = max(end - step, 0) * (per_step if per_step > 0 else 0.0)
        b = self.fraction
        return (b * (self.elapsed() + remaining) - self.spent) / (1 - b)

    def state_dict(self) -> dict[str, Any]:
        return {"spent": self.spent, "elapsed": self.elapsed(), "next_step": self.next_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spent = float(state.get("spent", 0.0))
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.next_step = state.get("next_step")
        self._t0 = self._mark = None
