"""When SharpnessMonitor measures: after every N-th optimizer step, or on the cost-aware schedule that keeps the time
spent inside the monitor within a share b of the fit's wall time (:class:`~lightning_opt.callbacks._budget.
OverheadBudget`; the guarantee is stated in :mod:`lightning_opt.callbacks.sharpness`).

The cost-aware schedule calibrates ``CALIBRATION_STEPS`` steps into each fit call that has no plan for its length
(a resumed fit keeps the plan made for the same last step). Costs (:class:`CostModel`): C_w, the worst case, and C_e,
the expected cost (the mean measured one; C_w before any). Every plan is made when the calibration or a measurement
ends, at optimizer step s, and agreed by all ranks (the latest step any rank asks for):

* fit length known (``end`` = ``trainer.estimated_stepping_batches``): R, the seconds of measurements the rest of
  the fit affords (:meth:`OverheadBudget.room`: S + R ≤ b·(T + (end − s)·t + R), t the step time since the last
  plan). If R ≥ C_w, k = 1 + ⌊(R − C_w)/C_e⌋ measurements are left and the next is ⌈(end − s)/k⌉ steps on (so a
  measurement that cost C_e leaves k − 1 for the rest: even spacing, the last at ``end``); the first of a fit call
  comes no later than ``FIRST_WITHIN`` of its steps in. If R < C_w: one measurement *capped* at the products R
  affords (:attr:`MeasurementSchedule.cap`, agreed as the smallest over ranks), when that is at least
  ``MIN_CAPPED_PRODUCTS`` Lanczos products; else none (the next step is past ``end``), which the monitor
  announces once when it is the calibration's plan;
* length unknown: the first step where one measurement of cost C (C_w at calibration, then the last measured
  cost) fits, :meth:`OverheadBudget.steps_until_affordable`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_opt._validation import check_float, check_int, invalid
from lightning_opt.callbacks._budget import OverheadBudget
from lightning_opt.callbacks._common import collective_device, log_text
from lightning_opt.distributed.buckets import is_dist
from lightning_opt.distributed.scalars import all_gather_vector

__all__ = ["CALIBRATION_STEPS", "DEFAULT_MAX_OVERHEAD", "FIRST_WITHIN", "CostModel", "MeasurementSchedule"]

#: Budget of the cost-aware schedule: seconds inside the monitor / fit seconds.
DEFAULT_MAX_OVERHEAD = 0.015

#: Optimizer steps into a fit call before the cost-aware schedule times one product; the step time is measured
#: over the second half of them (the first steps of a fit are slow: compilation, autotuning, data loader start).
CALIBRATION_STEPS = 10

#: With a known fit length, the first measurement comes within this share of the fit call's steps (or right
#: after the calibration when that is later).
FIRST_WITHIN = 0.05

#: Fewest Lanczos products of a measurement capped to what the budget affords (fewer resolve little beyond λ_max).
MIN_CAPPED_PRODUCTS = 8


class CostModel:
    """Seconds of one measurement. ``build`` (the gradients that build the operator) and ``product`` (one
    Hessian-vector product) are timed at calibration; ``products`` = ``max_iter`` (+ the smoothness product).

    * :meth:`expected`: the mean measured cost (before any measurement: :meth:`worst`);
    * :meth:`worst`: ``build + products·product`` before any measurement; then the mean measured cost scaled from
      the mean observed product count (``matvecs``) to ``products``, so it follows the measured product cost.
    """

    def __init__(self) -> None:
        self.build, self.product, self.products, self.extra = math.nan, math.nan, 0, 0
        self.count, self.seconds, self.matvecs = 0, 0.0, 0.0

    def timed(self, build: float, product: float, products: int, extra: int) -> None:
        """``extra``: of the ``products``, those that are not Lanczos iterations (the smoothness product)."""
        self.build, self.product, self.products, self.extra = build, product, products, extra

    def observe(self, seconds: float, matvecs: float) -> None:
        self.count += 1
        self.seconds += seconds
        self.matvecs += matvecs if math.isfinite(matvecs) else self.products

    def _predict(self, products: float) -> float:
        return self.build + self.product * products

    def expected(self) -> float:
        return self.seconds / self.count if self.count else self.worst()

    def affordable(self, seconds: float) -> int:
        """The most products a measurement can make within ``seconds`` (the calibrated line, scaled as in
        :meth:`worst` by how the measured costs compared with it)."""
        if not self.product > 0:
            return 0
        scale = 1.0
        if self.count:
            typical = self._predict(self.matvecs / self.count)
            scale = (self.seconds / self.count) / typical if typical > 0 else 1.0
        return max(0, math.floor((seconds / max(scale, 1e-12) - self.build) / self.product))

    def worst(self) -> float:
        bound = self._predict(self.products)
        if not self.count:
            return bound
        mean = self.seconds / self.count
        typical = self._predict(self.matvecs / self.count)
        return max(mean, mean * bound / typical) if typical > 0 and math.isfinite(bound) else mean

    def state_dict(self) -> dict[str, Any]:
        return {"build": self.build, "product": self.product, "products": self.products, "count": self.count,
                "seconds": self.seconds, "matvecs": self.matvecs, "extra": self.extra}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.build, self.product, self.products = state["build"], state["product"], state["products"]
        self.count, self.seconds, self.matvecs = state["count"], state["seconds"], state["matvecs"]
        self.extra = state.get("extra", 0)


class MeasurementSchedule:
    """``every_n_steps=N``: measure after every N-th optimizer step. ``every_n_steps=None``: calibrate
    ``CALIBRATION_STEPS`` steps into a fit, then measure at each step the budget ``max_overhead`` affords (spread
    over the fit when its length is known), planned when the previous measurement (or the calibration) ends and
    agreed by every rank then (max over ranks). The arguments are SharpnessMonitor's and checked here
    (``max_overhead=None``: ``DEFAULT_MAX_OVERHEAD`` on the cost-aware schedule); ``clock`` is for tests."""

    def __init__(self, every_n_steps: int | None, max_overhead: float | None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
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
        self.budget = OverheadBudget(max_overhead if max_overhead is not None else 1.0, clock=clock)
        self.cost = CostModel()
        self.calibrate_at: int | None = None
        self.mark_at: int | None = None
        self.measured_this_fit = False
        self.end: int | None = None  # this fit call's last step (None: unknown)
        self.plan_end: int | None = None  # the ``end`` the current plan was made for
        self.first_by = 0  # with a known end: the step the first measurement comes by
        self.notice: str | None = None  # progress-bar text when this fit affords no measurement
        self.cap: int | None = None  # products of the next measurement when the budget affords no full one

    @property
    def cost_aware(self) -> bool:
        return self.every_n_steps is None

    def fit_end(self, trainer: pl.Trainer) -> int | None:
        """The optimizer step the fit ends at, ``trainer.estimated_stepping_batches`` (``max_steps`` or
        ``max_epochs``), on the cost-aware schedule; None when Lightning cannot tell (infinite or unknown)."""
        if not self.cost_aware:
            return None
        try:
            total = trainer.estimated_stepping_batches
        except MisconfigurationException:  # accumulate_grad_batches that changes between epochs
            return None
        return int(total) if math.isfinite(total) and total > 0 else None

    def start(self, step: int, *, new_run: bool, end: int | None = None) -> None:
        """A fit call starts at optimizer step ``step`` and ends at ``end`` (None: unknown); ``new_run``: a fresh
        Trainer, whose step numbers and timings have nothing to do with the budget's. A plan made for another fit
        length is made again (after a new calibration) in this fit."""
        if new_run:
            self.budget.reset()
            self.cost, self.plan_end = CostModel(), None
        self.budget.start(step)
        self.calibrate_at = step + CALIBRATION_STEPS
        self.mark_at = step + CALIBRATION_STEPS // 2
        self.measured_this_fit = False
        self.notice = None
        self.end = end if self.cost_aware and end is not None and end > step else None
        self.first_by = step + math.ceil(FIRST_WITHIN * (self.end - step)) if self.end is not None else 0
        if self.cost_aware and self.budget.next_step is not None and self.plan_end != self.end:
            self.budget.next_step = None

    def stop(self) -> None:
        """The fit call ended; an INFO note when the cost-aware schedule measured nothing in it (and has not said
        so)."""
        self.budget.stop()
        if not self.cost_aware or self.measured_this_fit or self.notice is not None:
            return
        planned = self.budget.next_step
        why = (f"the next one is planned at step {planned}" if planned is not None else
               f"the cost-aware schedule calibrates after {CALIBRATION_STEPS} steps of a fit")
        rank_zero_info(f"SharpnessMonitor: no measurement in this fit (max_overhead={self.max_overhead:g}; {why}); "
                       "pass every_n_steps=N for a fixed schedule.")

    def tick(self, step: int) -> None:
        """After optimizer step ``step``: the step time starts once the fit's slow first steps are over."""
        if step == self.mark_at:
            self.budget.mark(step)

    @property
    def uncalibrated(self) -> bool:
        return self.cost_aware and self.budget.next_step is None

    def calibration_due(self, step: int) -> bool:
        return self.uncalibrated and self.calibrate_at is not None and step >= self.calibrate_at

    def iterations(self, max_iter: int) -> int:
        """Lanczos products of the next measurement: ``max_iter``, or fewer when it is capped (:attr:`cap` counts
        the measurement's other products too)."""
        return max_iter if self.cap is None else min(max_iter, self.cap - self.cost.extra)

    def due(self, step: int) -> bool:
        if self.every_n_steps is not None:
            return step % self.every_n_steps == 0
        return self.budget.next_step is not None and step >= self.budget.next_step

    def calibrated(self, step: int, seconds: float, build: float, product: float, products: int,
                   extra: int) -> str:
        """Plan the first measurement from the timed ``build`` (gradients) and ``product`` seconds, ``products``
        the most products of a measurement (``seconds`` spent calibrating); the note that says when it runs (a
        warning when the fit affords none: then :attr:`notice` is set)."""
        self.budget.charge(seconds)
        self.cost.timed(build, product, products, extra)
        per_step = self.budget.step_time(step)
        ahead, room, count = self._next(step, self.cost.worst(), first=True)
        ahead, _, cost, room = self._agree(ahead, self.cost.worst(), room)
        self._plan(step, ahead)
        steps = f"≈ {cost / per_step:.0f} training steps of {1000 * per_step:.3g} ms" if per_step > 0 else "?"
        if self.cap is not None:
            return (f"SharpnessMonitor: the budget affords no full measurement in this fit (≤ {cost:.3g} s, {steps}; "
                    f"budget {room:.3g} s: max_overhead={self.max_overhead:g} of the forecast time of the fit to step "
                    f"{self.end}): one capped at {self.cap} products runs at step {self.budget.next_step}, more if it "
                    "costs less (its `converged` says whether the cap bound).")
        if self.end is None:
            return (f"SharpnessMonitor: one measurement is estimated at {cost:.3g} s ({steps}); to keep the monitor "
                    f"within max_overhead={self.max_overhead:g} of fit time the first one runs at step "
                    f"{self.budget.next_step} (pass every_n_steps=N for a fixed schedule).")
        if self.budget.next_step > self.end:
            self.notice = f"no measurement in this fit (needs {cost:.2g} s, budget {max(room, 0.0):.2g} s)"
            return (f"SharpnessMonitor: the budget allows no measurement in this fit (needs {cost:.3g} s, {steps}; "
                    f"budget {max(room, 0.0):.3g} s: max_overhead={self.max_overhead:g} of the forecast time of "
                    f"the fit to step {self.end}, less {self.budget.spent:.3g} s already spent); pass every_n_steps=N, "
                    "a larger max_overhead or a longer fit.")
        return (f"SharpnessMonitor: one measurement is estimated at ≤ {cost:.3g} s ({steps}); max_overhead="
                f"{self.max_overhead:g} of the forecast time of the fit to step {self.end} affords {count} at that "
                f"cost: the first at step {self.budget.next_step}, the others evenly spaced up to step {self.end}, "
                "more if they cost less (pass every_n_steps=N for a fixed schedule).")

    def announce(self, trainer: pl.Trainer, note: str, prefix: str) -> None:
        """Say what :meth:`calibrated` planned: INFO; when the fit affords no measurement (:attr:`notice`), a
        warning, the progress bar (``sharpness``, or ``prefix`` for a second monitor) and TensorBoard text."""
        if self.notice is None:
            rank_zero_info(note)
            return
        rank_zero_warn(note)
        trainer.progress_bar_metrics["sharpness" if prefix == "curvature" else prefix] = self.notice
        log_text(trainer, f"{prefix}/schedule", note, trainer.global_step)

    def measured(self, step: int, seconds: float, matvecs: float = math.nan) -> dict[str, float]:
        """Account a measurement of ``seconds`` (``matvecs`` products) at ``step`` and plan the next
        (cost-aware); the values to log under the prefix: ``seconds`` (max over ranks), ``next_step``
        (cost-aware; past the fit's last step: none more in this fit) and ``overhead``."""
        self.measured_this_fit = True
        self.budget.charge(seconds)
        ahead, room = None, 0.0
        if self.cost_aware:
            self.cost.observe(seconds, matvecs)
            ahead, room, _ = self._next(step, seconds)
        ahead, share, seconds, _ = self._agree(ahead, seconds, room)
        out = {"seconds": seconds}
        if ahead is not None:
            self._plan(step, ahead)
            out["next_step"] = float(self.budget.next_step)
        out["overhead"] = share
        return out

    def _next(self, step: int, cost: float, *, first: bool = False) -> tuple[int, float, int]:
        """Steps from ``step`` to the next measurement, the seconds of measurements the forecast still affords
        and how many. Unknown end: the first affordable step for one of ``cost`` (the budget's rule). Known end:
        if S + C_w ≤ b·(forecast fit time), as many as S + C_w + (k − 1)·C_e fits, evenly over the remaining
        steps (the last at ``end``; the ``first`` of a fit by ``first_by``); else past ``end``."""
        if self.end is None:
            return self.budget.steps_until_affordable(step, cost), 0.0, 0
        left = self.end - step
        room, worst = self.budget.room(step, self.end), self.cost.worst()
        self.cap = None
        if left < 1 or not room >= worst:  # no full measurement: one capped at the products the room affords, or none
            cap = self.cost.affordable(room) if left >= 1 else 0
            if cap - self.cost.extra >= MIN_CAPPED_PRODUCTS:
                self.cap = cap
                return (max(1, min(left, self.first_by - step)) if first else left), room, 1
            return max(left, 0) + 1, room, 0
        expected = self.cost.expected()
        count = 1 + int((room - worst) // expected) if expected > 0 else left
        ahead = max(1, math.ceil(left / count))
        if first:
            ahead = min(ahead, max(1, self.first_by - step))
        return ahead, room, count

    def _agree(self, ahead: int | None, cost: float, room: float) -> tuple[int | None, float, float, float]:
        """``ahead`` (steps to the next measurement, None on the fixed schedule), the share of fit time spent in
        the monitor and ``cost``, each the max over ranks, and ``room``, the min (one all-gather), so every rank
        plans the same step and logs the same values."""
        cap = -float(self.cap) if self.cap is not None else -math.inf
        mine = torch.tensor([float(ahead or 0), self.budget.share(), cost, -room, cap], dtype=torch.float64)
        if is_dist():
            mine = all_gather_vector(mine.to(collective_device())).amax(0).cpu()
        ahead_all, share, cost_all, neg_room, neg_cap = mine.tolist()
        # a cap on any rank caps every rank at the smallest (Lanczos' products are collectives in global mode)
        self.cap = int(-neg_cap) if math.isfinite(neg_cap) else None
        return (int(ahead_all) if ahead is not None else None), share, cost_all, -neg_room

    def _plan(self, step: int, ahead: int) -> None:
        self.budget.next_step = step + ahead
        self.budget.mark(step)  # the next plan's step time: the steps between now and then
        self.plan_end = self.end

    def state_dict(self) -> dict[str, Any]:
        return {**self.budget.state_dict(), "cost": self.cost.state_dict(), "plan_end": self.plan_end,
                "cap": self.cap}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.budget.load_state_dict(state)
        if state.get("cost") is not None:
            self.cost.load_state_dict(state["cost"])
        self.plan_end = state.get("plan_end")
        self.cap = state.get("cap")
