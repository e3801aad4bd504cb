"""SharpnessMonitor's cost-aware schedule on a fake clock: with the fit's length known, the measurements the budget
affords are spread over the whole fit (the first within its first 5%); without it, the budget's rule of old."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from lightning_opt.callbacks._sharpness_schedule import CALIBRATION_STEPS, CostModel, MeasurementSchedule

STEP = 0.1  # seconds per training step
CALIBRATION = 0.2  # seconds the calibration takes
# the timed costs: 0.1 s of gradients plus 0.02 s per product, 41 products at most (max_iter 40 + smoothness)
BUILD, PRODUCT, PRODUCTS = 0.1, 0.02, 41


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _fit(end, *, fraction=0.015, build=BUILD, steps=2000, measurement=lambda i: (0.4, 15), step_time=lambda s: STEP,
         schedule=None, clock=None, first=0, extra=0):
    """Run steps ``first + 1 .. steps`` of a fit whose steps take ``step_time(step)`` s and whose i-th measurement
    costs ``measurement(i)`` = (seconds, products); the plans made, the schedule and the calibration note."""
    clock = clock or FakeClock()
    schedule = schedule or MeasurementSchedule(None, fraction, clock=clock)
    schedule.start(first, new_run=False, end=end)
    plans, note = [], None
    for step in range(first + 1, steps + 1):
        clock.t += step_time(step)
        schedule.tick(step)
        if schedule.uncalibrated:
            if schedule.calibration_due(step):
                clock.t += CALIBRATION
                note = schedule.calibrated(step, CALIBRATION, build, PRODUCT, PRODUCTS, extra)
                iterations = schedule.iterations(PRODUCTS - extra)
                plans.append((step, schedule.budget.next_step))
        elif schedule.due(step):
            seconds, products = measurement(len(plans) - 1)
            clock.t += seconds
            plans.append((step, int(schedule.measured(step, seconds, products)["next_step"])))
    schedule.stop()
    schedule.first_iterations = iterations if note is not None else None
    return plans, schedule, note


def test_a_known_fit_length_spreads_the_measurements_over_the_whole_fit():
    # calibration at step 10 (1.2 s in, 0.2 s of it calibrating; 0.1 s steps): C_w = 0.1 + 41 * 0.02 = 0.92 s. The
    # forecast fit time is 1.2 + 1990 * 0.1 s, the room (0.015 (1.2 + 199) - 0.2) / 0.985 = 2.846 s affords
    # 1 + floor((2.846 - 0.92) / 0.92) = 3 at that cost, ceil(1990 / 3) = 664 steps apart, but the first comes by
    # ceil(0.05 * 2000) = 100. It costs 0.4 s for 15 products: C_e = 0.4 s, C_w = 0.4 * 0.92 / (0.1 + 15 * 0.02) =
    # 0.92 s; room (0.015 (10.6 + 190) - 0.6) / 0.985 = 2.446 s: 1 + floor(1.526 / 0.4) = 4 more, ceil(1900 / 4) =
    # 475 apart. Each measurement leaves 0.4 s less room (4, 3, 2, 1 more): even spacing, the last at step 2000.
    plans, schedule, note = _fit(2000)
    assert plans == [(10, 100), (100, 575), (575, 1050), (1050, 1525), (1525, 2000), (2000, 2001)]
    assert "affords 3 at that cost: the first at step 100" in note and schedule.notice is None
    # over the whole fit the monitor stayed within its budget (5 * 0.4 s + 0.2 s of 200 s of training)
    assert schedule.budget.share() == pytest.approx(2.2 / 202.2)


def test_the_first_measurement_follows_the_calibration_when_the_budget_affords_many():
    # a 0.0048 s measurement (0.02 s steps, 0.1 of them in the monitor): evenly spaced from the calibration on,
    # the first well before 5% of the fit
    plans, schedule, _ = _fit(2000, fraction=0.1, build=0.0, measurement=lambda i: (0.0048, 0.0),
                              step_time=lambda s: 0.02)
    steps = [s for s, _ in plans[1:]]
    assert plans[0][0] == CALIBRATION_STEPS and steps[0] <= 100 and steps[-1] == 2000
    gaps = {b - a for a, b in zip(steps, steps[1:])}
    assert max(gaps) - min(gaps) <= 1, gaps
    assert schedule.budget.share() <= 0.1


def test_a_fit_the_budget_affords_nothing_says_so_once_and_measures_nothing(monkeypatch):
    # C_w = 4.18 + 41 * 0.02 = 5 s against a room of 2.85 s
    plans, schedule, note = _fit(2000, build=4.18)
    assert plans == [(10, 2001)]  # planned past the fit's last step
    assert schedule.notice == "no measurement in this fit (needs 5 s, budget 2.8 s)"
    assert note.startswith("SharpnessMonitor: the budget allows no measurement in this fit (needs 5 s,")
    assert "budget 2.85 s: max_overhead=0.015 of the forecast time of the fit to step 2000" in note

    warned, info = [], []
    monkeypatch.setattr("lightning_opt.callbacks._sharpness_schedule.rank_zero_warn", warned.append)
    monkeypatch.setattr("lightning_opt.callbacks._sharpness_schedule.rank_zero_info", info.append)
    trainer = SimpleNamespace(progress_bar_metrics={}, global_rank=0, loggers=[], global_step=10)
    schedule.announce(trainer, note, "curvature")
    assert warned == [note] and info == []
    assert trainer.progress_bar_metrics == {"sharpness": schedule.notice}
    schedule.stop()  # the end of the fit does not repeat it
    assert info == []


def test_a_budget_short_of_a_full_measurement_caps_one_at_the_products_it_affords():
    # b = 0.004: room (0.004 (1.2 + 199) - 0.2) / 0.996 = 0.6032 s < C_w = 0.92 s, but it affords
    # floor((0.6032 - 0.1) / 0.02) = 25 products: one measurement capped at 25, by step 100; over the fit the monitor
    # stays within b (0.2 s calibrating + 0.4 s measuring of 200 s)
    plans, schedule, note = _fit(2000, fraction=0.004)
    assert plans[0] == (10, 100) and schedule.notice is None
    assert "one capped at 25 products runs at step 100" in note
    assert schedule.budget.share() <= 0.004
    assert schedule.first_iterations == 25
    _, capped, note = _fit(2000, fraction=0.004, extra=1)  # one of the 41 is the smoothness product: 24 Lanczos
    assert "one capped at 25 products" in note and capped.first_iterations == 24
    # below MIN_CAPPED_PRODUCTS Lanczos products it is none at all, as before
    plans, schedule, _ = _fit(2000, fraction=0.0022)
    assert plans == [(10, 2001)] and schedule.cap is None and schedule.notice.startswith("no measurement")


def test_an_unknown_fit_length_keeps_the_budget_rule_of_old():
    # the first affordable step for C_w: max((0.2 + 0.92) / 0.015 - 0.92 - 1.2, 0.92 * 0.985 / 0.015) = 72.55 s
    # of training, 726 steps; then the measured 0.4 s, 263 steps apart (the values of the schedule before the
    # forecast existed, same clock)
    plans, schedule, note = _fit(None)
    assert plans == [(10, 736), (736, 999), (999, 1262), (1262, 1525), (1525, 1788), (1788, 2051)]
    assert "the first one runs at step 736" in note and schedule.notice is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_budget_holds_over_the_fit_whatever_each_measurement_costs(seed):
    rng = random.Random(seed)

    def measurement(i):
        products = rng.randint(8, PRODUCTS)  # at most max_iter: within the worst case
        return BUILD + PRODUCT * products, products

    plans, schedule, _ = _fit(3000, fraction=0.02, steps=3000, measurement=measurement)
    assert len(plans) >= 4 and plans[1][0] <= 150
    assert schedule.budget.share() <= 0.02


def test_a_resumed_fit_keeps_a_plan_for_its_length_and_replans_for_another():
    clock = FakeClock()
    plans, schedule, _ = _fit(2000, steps=600, clock=clock)
    assert plans[-1] == (575, 1050)
    state = schedule.state_dict()

    same = MeasurementSchedule(None, 0.015, clock=clock)
    same.load_state_dict(state)
    resumed, _, _ = _fit(2000, steps=1100, schedule=same, clock=clock, first=600)
    assert resumed[0] == (1050, 1525)  # no calibration: the plan made for step 2000 is kept

    longer = MeasurementSchedule(None, 0.015, clock=clock)
    longer.load_state_dict(state)
    replanned, _, note = _fit(4000, steps=700, schedule=longer, clock=clock, first=600)
    assert replanned[0][0] == 600 + CALIBRATION_STEPS and "to step 4000" in note
    assert replanned[0][1] <= 600 + 0.05 * 3400  # the first of this fit within its first 5%


def test_cost_model_expects_the_measured_cost_and_scales_it_to_max_iter_for_the_worst_case():
    cost = CostModel()
    cost.timed(0.1, 0.02, 41)
    assert cost.expected() == cost.worst() == pytest.approx(0.92)  # nothing measured: the bound
    cost.observe(0.5, 15)
    cost.observe(0.3, 5)
    # mean 0.4 s at a mean of 10 products, predicted 0.3 s: the products cost 4/3 of the timed one
    assert cost.expected() == pytest.approx(0.4)
    assert cost.worst() == pytest.approx(0.4 * 0.92 / 0.3)
    restored = CostModel()
    restored.load_state_dict(cost.state_dict())
    assert (restored.expected(), restored.worst()) == (cost.expected(), cost.worst())
