"""The sync clock by value (``strategies/_clock.py``), in process: when syncs fall, what the progress bar is told,
and that the state survives a checkpoint round trip."""

import pytest

from lightning_opt.strategies._clock import SyncClock
from lightning_opt.strategies.schedules import ConstantHorizon, ConstantPeriod


def _run(clock: SyncClock, steps: int, lr: float = 0.1) -> list[int]:
    """Drive optimizer 0 as PeriodicSyncStrategy.optimizer_step does; the steps after which it synced."""
    synced = []
    for _ in range(steps):
        step = clock.upcoming(0)
        clock.count(0, step)
        if clock.in_warmup(step):
            continue
        if not clock.scheduled(0):
            clock.schedule_next(0, step - 1, lr, None)
        if clock.due(0, step):
            synced.append(step)
            clock.schedule_next(0, step, lr, None)
    return synced


def test_syncs_fall_after_warmup_plus_each_period():
    clock = SyncClock(ConstantPeriod(3), warmup_steps=2)
    assert _run(clock, 12) == [5, 8, 11]
    assert clock.current_period == 3 and clock.next_sync == {0: 14}
    assert clock.steps_to_next_sync(0.1) == 2


def test_the_progress_bar_reads_warmup_then_the_steps_left():
    clock = SyncClock(ConstantPeriod(4), warmup_steps=3)
    _run(clock, 2)
    assert clock.steps_to_next_sync(0.1) == "warmup"
    _run(clock, 1)  # warm-up done, local training not started: the period it will get
    assert clock.steps_to_next_sync(0.1) == 4 and clock.current_period == 0
    _run(clock, 1)
    assert clock.steps_to_next_sync(0.1) == 3


def test_a_horizon_is_asked_again_at_every_sync():
    clock = SyncClock(ConstantHorizon(0.5), warmup_steps=0)
    assert _run(clock, 6, lr=0.25) == [2, 4, 6]  # tau = 0.5 / 0.25
    # the period that started at step 6 was set with lr 0.25 (ends at 8); the lr drop to 0.1 gives tau = 5 from there
    assert _run(clock, 10, lr=0.1) == [8, 13]
    assert clock.period == {0: 5}


def test_state_round_trips_and_a_bad_schedule_is_refused():
    clock = SyncClock(ConstantPeriod(3), warmup_steps=1)
    _run(clock, 5)
    restored = SyncClock(ConstantPeriod(3), warmup_steps=1)
    restored.load_state_dict(clock.state_dict())
    assert (restored.steps, restored.next_sync, restored.period) == (clock.steps, clock.next_sync, clock.period)
    assert _run(SyncClock(ConstantPeriod(1), warmup_steps=0), 3) == [1, 2, 3]  # period 1: averaging every step
    assert _run(restored, 6) == _run(clock, 6) == [7, 10]

    class Zero(ConstantPeriod):
        def next_period(self, step, lr, trainer=None):
            return 0

    with pytest.raises(ValueError, match="returned period 0 < 1"):
        SyncClock(Zero(1), warmup_steps=0).schedule_next(0, 0, 0.1, None)


class _Asked(ConstantPeriod):
    """Records what the clock asks and restores; answers 2 + step."""

    def __init__(self) -> None:
        super().__init__(1)
        self.asked, self.loaded = [], []

    def next_period(self, step, lr, trainer=None):
        self.asked.append((step, lr, trainer))
        return 2 + step

    def state_dict(self):
        return {"asked": len(self.asked)}

    def load_state_dict(self, state):
        self.loaded.append(state)


def test_before_any_step_the_answer_comes_from_the_schedule_with_the_current_lr():
    assert SyncClock(ConstantPeriod(4), warmup_steps=1).steps_to_next_sync(0.1) == "warmup"
    schedule = _Asked()
    assert SyncClock(schedule, warmup_steps=0).steps_to_next_sync(0.3) == 2
    assert schedule.asked == [(0, 0.3, None)]
    SyncClock(schedule, warmup_steps=0).schedule_next(0, 5, 0.2, "the trainer")
    assert schedule.asked[-1] == (5, 0.2, "the trainer")  # CurvatureAdaptivePeriod reads the trainer
    restored = _Asked()
    SyncClock(restored, warmup_steps=0).load_state_dict(SyncClock(schedule, warmup_steps=0).state_dict())
    assert restored.loaded == [{"asked": 2}]


def test_the_steps_that_communicate_are_warmup_the_first_local_step_and_each_sync():
    clock = SyncClock(ConstantPeriod(3), warmup_steps=2)
    talks = []
    for _ in range(9):
        talks.append(clock.next_step_communicates(1, averaged=False))
        _run(clock, 1)
    assert [step for step, t in enumerate(talks, start=1) if t] == [1, 2, 3, 5, 8]
    assert clock.next_step_communicates(1, averaged=True) and clock.next_step_communicates(0, averaged=False)
    assert not clock.next_step_communicates(1, averaged=False)  # step 10: local
    clock.schedule_next(1, 0, 0.1, None)  # a second optimizer whose sync is due at its next step (3)
    clock.count(1, 2)
    assert clock.next_step_communicates(2, averaged=False)


def test_constant_horizon_keeps_at_least_one_step_and_caps_a_zero_lr():
    """γk = s rounded, never below 1 (s = 0.4 at γ = 1 rounds to 0) nor above ``max_period``, which is also the
    period at γ = 0 (no horizon is reached)."""
    schedule = ConstantHorizon(0.4, max_period=7)
    assert [schedule.next_period(0, lr) for lr in (1.0, 0.1, 0.05, 0.0)] == [1, 4, 7, 7]
