"""When to synchronise: step counters, the next sync step and the period schedule (pure Python, no Lightning).

One 1-based counter per optimizer counts its steps (after gradient accumulation; manual optimisation counts
``optimizer.step()`` calls). Steps ``1..warmup_steps`` are warm-up steps. After warm-up the schedule is asked for
τ, and the sync runs after step ``warmup_steps + τ``, then after each further period, τ being asked again at
every sync (``ConstantHorizon`` and ``CurvatureAdaptivePeriod`` change it as the lr or the curvature moves).
"""

from __future__ import annotations

from typing import Any

from lightning_opt.strategies.schedules import PeriodSchedule


class SyncClock:
    """The counters of one strategy; everything here is identical on every rank and saved in checkpoints."""

    def __init__(self, schedule: PeriodSchedule, warmup_steps: int) -> None:
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.steps: dict[int, int] = {}  # optimizer index -> steps taken
        self.next_sync: dict[int, int] = {}  # optimizer index -> the step after which it syncs next
        self.period: dict[int, int] = {}  # optimizer index -> the period in progress

    def upcoming(self, idx: int) -> int:
        """The number of optimizer ``idx``'s step about to run."""
        return self.steps.get(idx, 0) + 1

    def in_warmup(self, step: int) -> bool:
        return step <= self.warmup_steps

    def count(self, idx: int, step: int) -> None:
        self.steps[idx] = step

    def scheduled(self, idx: int) -> bool:
        """Whether optimizer ``idx``'s local training has started (its first period is scheduled)."""
        return idx in self.next_sync

    def due(self, idx: int, step: int) -> bool:
        return self.next_sync.get(idx) == step

    def next_step_communicates(self, optimizers: int, averaged: bool) -> bool:
        """Whether the next step of some optimizer averages gradients (warm-up, or ``averaged``: every step) or may
        end in a sync (before its first period is scheduled, it may); True while there is no optimizer yet."""
        if averaged or optimizers == 0:
            return True
        return any(self.in_warmup(self.upcoming(i)) or not self.scheduled(i) or self.due(i, self.upcoming(i))
                   for i in range(optimizers))

    def schedule_next(self, idx: int, step: int, lr: float, trainer: Any) -> None:
        """Ask the schedule for the period that starts after ``step``."""
        period = int(self.schedule.next_period(step, lr, trainer))
        if period < 1:
            raise ValueError(f"period schedule {self.schedule!r} returned period {period} < 1")
        self.period[idx] = period
        self.next_sync[idx] = step + period

    @property
    def current_period(self) -> int:
        """The first optimizer's period in progress (else any optimizer's; 0 before local training)."""
        return self.period.get(0, next(iter(self.period.values()), 0))

    def steps_to_next_sync(self, lr: float) -> int | str:
        """The first optimizer's steps until its next sync; ``"warmup"`` during warm-up."""
        step = self.steps.get(0, 0)
        if step < self.warmup_steps:
            return "warmup"
        if 0 not in self.next_sync:
            return self.schedule.next_period(step, lr, None)
        return self.next_sync[0] - step

    def state_dict(self) -> dict[str, Any]:
        return {"steps": dict(self.steps), "next_sync": dict(self.next_sync), "period_now": dict(self.period),
                "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = {int(k): int(v) for k, v in state["steps"].items()}
        self.next_sync = {int(k): int(v) for k, v in state["next_sync"].items()}
        self.period = {int(k): int(v) for k, v in state["period_now"].items()}
        self.schedule.load_state_dict(state["schedule"])
