"""When SharpnessMonitor measures: after every N-th optimizer step, or on the cost-aware schedule that keeps the time
spent inside the monitor within a share of the fit's wall time (:class:`~lightning_opt.callbacks._budget.
OverheadBudget`; the schedule is described in :mod:`lightning_opt.callbacks.sharpness`)."""

from __future__ import annotations

from typing import Any

import torch

from lightning_opt._validation import check_float, check_int, invalid
from lightning_opt.callbacks._budget import OverheadBudget
from lightning_opt.callbacks._common import collective_device
from lightning_opt.distributed.buckets import is_dist
from lightning_opt.distributed.scalars import all_gather_vector

__all__ = ["CALIBRATION_STEPS", "DEFAULT_MAX_OVERHEAD", "MeasurementSchedule"]

#: Budget of the cost-aware schedule: seconds inside the monitor / fit seconds.
DEFAULT_MAX_OVERHEAD = 0.015

#: Optimizer steps into a fit call before the cost-aware schedule times one product; the step time is measured
#: over the second half of them (the first steps of a fit are slow: compilation, autotuning, data loader start).
CALIBRATION_STEPS = 10


class MeasurementSchedule:
    """``every_n_steps=N``: measure after every N-th optimizer step. ``every_n_steps=None``: calibrate
    ``CALIBRATION_STEPS`` steps into a fit, then measure at each step the budget ``max_overhead`` affords, planned
    when the previous measurement (or the calibration) ends and agreed by every rank then (max over ranks).
    The arguments are SharpnessMonitor's and checked here (``max_overhead=None``: ``DEFAULT_MAX_OVERHEAD`` on the
    cost-aware schedule)."""

    def __init__(self, every_n_steps: int | None, max_overhead: float | None) -> None:
        own = "SharpnessMonitor"
        if every_n_steps is not None:
            check_int("every_n_steps", every_n_steps, 1, owner=own)
            if max_overhead is not None:
                raise invalid("max_overhead", max_overhead, f"None with every_n_steps={every_n_steps!r} "
                              "(max_overhead sets the cost-aware schedule, every_n_steps=None: pass one of them)",
                              owner=own)
        else:
            max_overhead = check_float("max_overhead", DEFAULT_MAX_OVERHEAD if max_overhead is None else max_overhead,
                                       0.0, 1.0, low_open=True, high_open=True, owner=own)
        self.every_n_steps = every_n_steps
        self.max_overhead = max_overhead
        self.budget = OverheadBudget(max_overhead if max_overhead is not None else 1.0)
        self.calibrate_at: int | None = None
        self.mark_at: int | None = None
        self.measured_this_fit = 0

    @property
    def cost_aware(self) -> bool:
        return self.every_n_steps is None

    def start(self, step: int, *, new_run: bool) -> None:
        """A fit call starts at optimizer step ``step``; ``new_run``: a fresh Trainer, whose step numbers and
        timings have nothing to do with the budget's."""
        if new_run:
            self.budget.reset()
        self.budget.start(step)
        self.calibrate_at = step + CALIBRATION_STEPS
        self.mark_at = step + CALIBRATION_STEPS // 2
        self.measured_this_fit = 0

    def stop(self) -> str | None:
        """The fit call ended; a note when the cost-aware schedule measured nothing in it."""
        self.budget.stop()
        if not self.cost_aware or self.measured_this_fit:
            return None
        planned = self.budget.next_step
        why = (f"the next one is planned at step {planned}" if planned is not None else
               f"the cost-aware schedule calibrates after {CALIBRATION_STEPS} steps of a fit")
        return (f"SharpnessMonitor: no measurement in this fit (max_overhead={self.max_overhead:g}; {why}); pass "
                "every_n_steps=N for a fixed schedule.")

    def tick(self, step: int) -> None:
        """After optimizer step ``step``: the step time starts once the fit's slow first steps are over."""
        if step == self.mark_at:
            self.budget.mark(step)

    @property
    def uncalibrated(self) -> bool:
        return self.cost_aware and self.budget.next_step is None

    def calibration_due(self, step: int) -> bool:
        return self.uncalibrated and self.calibrate_at is not None and step >= self.calibrate_at

    def due(self, step: int) -> bool:
        if self.every_n_steps is not None:
            return step % self.every_n_steps == 0
        return self.budget.next_step is not None and step >= self.budget.next_step

    def calibrated(self, step: int, seconds: float, cost: float) -> str:
        """Plan the first measurement from the estimated ``cost`` of one (``seconds`` spent calibrating); the
        note that says when it runs."""
        self.budget.charge(seconds)
        per_step = self.budget.step_time(step)
        ahead, _, cost = self._agree(step, cost)
        self._plan(step, ahead)
        steps = f"≈ {cost / per_step:.0f} training steps of {1000 * per_step:.3g} ms" if per_step > 0 else "?"
        return (f"SharpnessMonitor: one measurement is estimated at {cost:.3g} s ({steps}); to keep the monitor "
                f"within max_overhead={self.max_overhead:g} of fit time the first one runs at step "
                f"{self.budget.next_step} (pass every_n_steps=N for a fixed schedule).")

    def measured(self, step: int, seconds: float) -> dict[str, float]:
        """Account a measurement of ``seconds`` at ``step`` and plan the next (cost-aware); the values to log
        under the prefix: ``seconds`` (max over ranks), ``next_step`` (cost-aware) and ``overhead``."""
        self.measured_this_fit += 1
        self.budget.charge(seconds)
        ahead, share, seconds = self._agree(step, seconds)
        out = {"seconds": seconds}
        if ahead is not None:
            self._plan(step, ahead)
            out["next_step"] = float(self.budget.next_step)
        out["overhead"] = share
        return out

    def _agree(self, step: int, cost: float) -> tuple[int | None, float, float]:
        """Steps until the next measurement is affordable (cost-aware schedule; else None), the share of fit
        time spent in the monitor and ``cost``, each the max over ranks (one all-gather), so every rank plans
        the same step and logs the same values."""
        ahead = self.budget.steps_until_affordable(step, cost) if self.cost_aware else 0
        mine = torch.tensor([float(ahead), self.budget.share(), cost], dtype=torch.float64)
        if is_dist():
            mine = all_gather_vector(mine.to(collective_device())).amax(0).cpu()
        ahead_all, share, cost_all = mine.tolist()
        return (int(ahead_all) if self.cost_aware else None), share, cost_all

    def _plan(self, step: int, ahead: int | None) -> None:
        self.budget.next_step = step + ahead
        self.budget.mark(step)  # the next plan's step time: the steps between now and then

    def state_dict(self) -> dict[str, Any]:
        return self.budget.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.budget.load_state_dict(state)
