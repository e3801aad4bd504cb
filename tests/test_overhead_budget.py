"""OverheadBudget: the share of fit time spent in a monitor stays within the budget, and no tighter."""

from __future__ import annotations

import random

import pytest

from lightning_opt.callbacks._budget import OverheadBudget


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _simulate(fraction: float, steps: int, seed: int) -> tuple[OverheadBudget, FakeClock, list[tuple[int, float]]]:
    """Training steps of random length; a measurement (of known cost) whenever the budget plans one."""
    rng = random.Random(seed)
    clock = FakeClock()
    budget = OverheadBudget(fraction, clock=clock)
    budget.start(0)
    cost = 2.0
    shares = []
    for step in range(1, steps + 1):
        clock.t += rng.uniform(0.05, 0.15)
        if step == 5:
            budget.next_step = step + budget.steps_until_affordable(step, cost)
        elif budget.next_step is not None and step == budget.next_step:
            # the cost the budget planned for, measured now
            clock.t += cost
            budget.charge(cost)
            shares.append((step, budget.share()))
            budget.next_step = step + budget.steps_until_affordable(step, cost)
    return budget, clock, shares


@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.3])
def test_share_stays_within_the_budget_and_measures_as_often_as_it_allows(fraction):
    budget, clock, shares = _simulate(fraction, steps=4000, seed=1)
    assert len(shares) >= 2
    # at the end of every measurement the share is at most the budget (up to the step-time estimate's error)
    assert max(s for _, s in shares) <= fraction * 1.1
    # ... and not far below it: measuring one step earlier each time would not have fitted
    assert min(s for _, s in shares[1:]) >= fraction * 0.8
    assert budget.share() <= fraction * 1.1


def test_step_time_excludes_measurements_and_wait_is_exact():
    clock = FakeClock()
    budget = OverheadBudget(0.1, clock=clock)
    budget.start(100)
    assert budget.step_time(100) != budget.step_time(100)  # nan before a step
    clock.t = 10.0  # 10 steps of 1 s
    budget.charge(0.0)
    assert budget.step_time(110) == pytest.approx(1.0)
    # S + C <= b (T + C) allows it after (0 + 2) / 0.1 - 2 - 10 = 8 more seconds of training, but one measurement
    # needs 2 (1 - 0.1) / 0.1 = 18 s of training at share 0.1: no burst on slack
    assert budget.steps_until_affordable(110, 2.0) == 18
    clock.t = 30.0  # 18 steps of training, then the 2 s measurement, at step 128
    budget.charge(2.0)
    assert budget.share() == pytest.approx(2.0 / 30.0)
    assert budget.step_time(128) == pytest.approx(1.0)  # the 2 s measurement is not training time
    # a 6 s one next: the budget allows it after (2 + 6) / 0.1 - 6 - 30 = 44 s, the spacing after 6 * 0.9 / 0.1 = 54 s
    assert budget.steps_until_affordable(128, 6.0) == 54
    # after an expensive surprise the budget binds: (2 + 10 + 2) / 0.1 - 2 - 30 = 108 s > 18 s
    clock.t = 40.0
    budget.charge(10.0)
    budget.mark(128)
    clock.t = 41.0  # one more 1 s step
    assert budget.steps_until_affordable(129, 2.0) == round((14 / 0.1 - 2 - 41) / 1.0)


def test_state_round_trip_continues_the_accounting():
    clock = FakeClock()
    budget = OverheadBudget(0.05, clock=clock)
    budget.start(0)
    clock.t = 40.0
    budget.charge(1.0)
    budget.next_step = 123
    state = budget.state_dict()

    clock2 = FakeClock()
    clock2.t = 1000.0  # a new process: its clock origin does not matter
    resumed = OverheadBudget(0.05, clock=clock2)
    resumed.load_state_dict(state)
    resumed.start(50)
    assert (resumed.next_step, resumed.spent) == (123, 1.0)
    assert resumed.elapsed() == pytest.approx(40.0)
    clock2.t += 10.0
    assert resumed.share() == pytest.approx(1.0 / 50.0)


def test_marked_step_time_leaves_the_slow_first_steps_out():
    clock = FakeClock()
    budget = OverheadBudget(0.02, clock=clock)
    budget.start(0)
    clock.t = 60.0  # step 1: compilation, autotuning, data loader start-up
    for step in range(2, 11):
        clock.t += 0.1
        if step == 5:
            budget.mark(step)
    assert budget.step_time(10) == pytest.approx(0.1)
    # the wait for a 2 s measurement is counted in 0.1 s steps: max((0 + 2) / 0.02 - 2 - 60.9, 2 * 0.98 / 0.02) = 98 s
    assert budget.steps_until_affordable(10, 2.0) == 980


def test_reset_forgets_the_run():
    budget = OverheadBudget(0.1, clock=FakeClock())
    budget.start(0)
    budget.charge(3.0)
    budget.next_step = 9
    budget.reset()
    assert (budget.spent, budget.next_step, budget.elapsed()) == (0.0, None, 0.0)


def test_stop_folds_the_fit_time_into_the_total():
    clock = FakeClock()
    budget = OverheadBudget(0.1, clock=clock)
    budget.start(0)
    clock.t = 5.0
    budget.stop()
    clock.t = 100.0  # time between fit calls is not fit time
    assert budget.elapsed() == pytest.approx(5.0)
    budget.start(10)
    clock.t = 103.0
    assert budget.elapsed() == pytest.approx(8.0)


def test_room_forecasts_what_the_rest_of_a_fit_of_known_length_affords():
    clock = FakeClock()
    budget = OverheadBudget(0.1, clock=clock)
    budget.start(0)
    assert budget.room(0, 1000) == pytest.approx(0.0)  # no step timed yet: no training to come is counted
    clock.t = 10.0  # 100 steps of 0.1 s; 900 more to come
    # S + X <= b (T + R + X): X = (0.1 (10 + 90) - 0) / 0.9
    assert budget.room(100, 1000) == pytest.approx(100 / 9)
    clock.t = 12.0  # a 2 s measurement at step 100 takes exactly 2 s off the room (its own time counts as fit time)
    budget.charge(2.0)
    assert budget.room(100, 1000) == pytest.approx(100 / 9 - 2)
    assert budget.room(1000, 1000) == pytest.approx((0.1 * 12 - 2) / 0.9)  # at the end: overspent, negative
