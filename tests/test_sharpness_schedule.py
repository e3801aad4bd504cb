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
    cost.timed(0.1, 0.02, 41, 0)
    assert cost.expected() == cost.worst() == pytest.approx(0.92)  # nothing measured: the bound
    cost.observe(0.5, 15)
    cost.observe(0.3, 5)
    # mean 0.4 s at a mean of 10 products, predicted 0.3 s: the products cost 4/3 of the timed one
    assert cost.expected() == pytest.approx(0.4)
    assert cost.worst() == pytest.approx(0.4 * 0.92 / 0.3)
    restored = CostModel()
    restored.load_state_dict(cost.state_dict())
    assert (restored.expected(), restored.worst()) == (cost.expected(), cost.worst())


def test_the_step_time_leaves_out_the_slow_first_steps():
    # steps 1-5 take 1 s (start-up), the rest 0.1 s: the step time is measured from step 5 on, so the plan and the
    # note are those of 0.1 s steps (C_w = 0.92 s ≈ 9 steps)
    plans, _, note = _fit(2000, step_time=lambda s: 1.0 if s <= 5 else STEP)
    assert plans[:3] == [(10, 100), (100, 575), (575, 1050)]
    assert "one measurement is estimated at ≤ 0.92 s (≈ 9 training steps of 100 ms)" in note


@pytest.mark.parametrize("end, fraction, extra, first, words", [
    # one step left after the calibration, a budget for 10 at C_w: the one measurement the fit has room for runs
    # at its last step (room (0.9 (1.2 + 0.1) - 0.2) / 0.1 = 9.7 s)
    (11, 0.9, 0, (10, 11), "affords 10 at that cost: the first at step 11,"),
    # the same step short of a full one: capped at floor((0.392 - 0.1) / 0.02) = 14 products
    (11, 0.35, 0, (10, 11), "one capped at 14 products runs at step 11"),
    # a 100-step fit: its first 5% are over at the calibration, so the first comes at the next step, capped at
    # floor((0.271 - 0.1) / 0.02) = 8 products, exactly the fewest allowed ...
    (100, 0.045, 0, (10, 11), "one capped at 8 products runs at step 11"),
    # ... of which one would be the smoothness product: 7 Lanczos products are too few, so none
    (100, 0.045, 1, (10, 101), "the budget allows no measurement in this fit (needs 0.92 s"),
    # and when the budget affords full ones (10, 9 steps apart), the first still comes at the next step
    (100, 0.5, 0, (10, 11), "affords 10 at that cost: the first at step 11,"),
])
def test_short_fits_plan_their_one_step_left_and_the_first_five_percent(end, fraction, extra, first, words):
    plans, _, note = _fit(end, fraction=fraction, steps=end, extra=extra)
    assert plans[0] == first and words in note


def test_measurements_that_take_no_time_run_at_every_step():
    plans, schedule, _ = _fit(2000, measurement=lambda i: (0.0, 15), steps=105)
    assert plans == [(10, 100)] + [(s, s + 1) for s in range(100, 106)]
    assert schedule.cost.expected() == 0.0


def test_the_notice_gives_a_budget_below_a_second():
    # room (0.0022 (1.2 + 199) - 0.2) / 0.9978 = 0.241 s
    _, schedule, note = _fit(2000, fraction=0.0022)
    assert schedule.notice == "no measurement in this fit (needs 0.92 s, budget 0.24 s)"
    assert "budget 0.241 s: max_overhead=0.0022 of the forecast time of the fit to step 2000" in note


def test_a_fit_without_a_measurement_says_why_at_its_end(monkeypatch):
    info = []
    monkeypatch.setattr("lightning_opt.callbacks._sharpness_schedule.rank_zero_info", info.append)
    _fit(None, steps=5)  # over before the calibration
    _fit(2000, steps=50)  # calibrated: the first is planned at step 100
    _fit(2000, steps=150)  # measured at step 100: nothing to say
    fixed = MeasurementSchedule(7, None)
    fixed.start(0, new_run=True, end=5)
    fixed.stop()  # the fixed schedule says nothing
    assert info == [
        "SharpnessMonitor: no measurement in this fit (max_overhead=0.015; the cost-aware schedule calibrates after "
        "10 steps of a fit); pass every_n_steps=N for a fixed schedule.",
        "SharpnessMonitor: no measurement in this fit (max_overhead=0.015; the next one is planned at step 100); "
        "pass every_n_steps=N for a fixed schedule."]


def test_a_new_run_forgets_the_costs_and_the_plan():
    _, schedule, _ = _fit(2000, steps=150)
    assert schedule.cost.count == 1 and schedule.budget.next_step == 575
    schedule.start(0, new_run=True, end=2000)
    assert schedule.cost.count == 0 and schedule.budget.next_step is None and schedule.plan_end is None
    assert schedule.uncalibrated and schedule.budget.spent == 0.0


def test_a_resumed_plan_due_before_the_step_time_is_marked_is_measured():
    clock = FakeClock()
    _, schedule, _ = _fit(2000, steps=572, clock=clock)
    resumed = MeasurementSchedule(None, 0.015, clock=clock)
    resumed.load_state_dict(schedule.state_dict())
    plans, _, _ = _fit(2000, steps=600, schedule=resumed, clock=clock, first=572)  # due at 575, marked at 577
    assert plans[0] == (575, 1050)


def test_the_fit_length_comes_from_lightning_on_the_cost_aware_schedule_only():
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    class Changing:
        @property
        def estimated_stepping_batches(self):
            raise MisconfigurationException("accumulate_grad_batches changes between epochs")

    aware = MeasurementSchedule(None, None)
    for total, end in ((2000.0, 2000), (1, 1), (0, None), (float("inf"), None)):
        assert aware.fit_end(SimpleNamespace(estimated_stepping_batches=total)) == end
    assert aware.fit_end(Changing()) is None
    assert MeasurementSchedule(3, None).fit_end(SimpleNamespace(estimated_stepping_batches=2000)) is None


def test_the_fixed_schedule_measures_every_nth_step_and_plans_nothing():
    every = MeasurementSchedule(1, None)  # the smallest N
    every.start(0, new_run=True, end=None)
    assert all(every.due(s) for s in range(1, 5)) and not every.uncalibrated
    assert set(every.measured(1, 0.25)) == {"seconds", "overhead"}
    third = MeasurementSchedule(3, None)
    assert [s for s in range(1, 10) if third.due(s)] == [3, 6, 9]


def test_announce_informs_or_warns_with_the_progress_bar_and_tensorboard(monkeypatch):
    _, planned, planned_note = _fit(2000, steps=20)
    _, none, none_note = _fit(2000, build=4.18, steps=20)
    said, logged = [], []
    monkeypatch.setattr("lightning_opt.callbacks._sharpness_schedule.rank_zero_info", lambda m: said.append(("i", m)))
    monkeypatch.setattr("lightning_opt.callbacks._sharpness_schedule.rank_zero_warn", lambda m: said.append(("w", m)))
    monkeypatch.setattr("lightning_opt.callbacks._sharpness_schedule.log_text", lambda *a: logged.append(a))
    trainer = SimpleNamespace(progress_bar_metrics={}, global_step=10)
    planned.announce(trainer, planned_note, "curvature")
    assert said == [("i", planned_note)] and trainer.progress_bar_metrics == {} and logged == []
    none.announce(trainer, none_note, "second")  # a second monitor's prefix
    assert said[1:] == [("w", none_note)] and trainer.progress_bar_metrics == {"second": none.notice}
    assert logged == [(trainer, "second/schedule", none_note, 10)]


def test_a_capped_plan_survives_a_checkpoint():
    _, schedule, _ = _fit(2000, fraction=0.004, steps=20)
    assert schedule.cap == 25
    restored = MeasurementSchedule(None, 0.004)
    restored.load_state_dict(schedule.state_dict())
    assert restored.cap == 25 and restored.iterations(40) == 25


def test_cost_model_affordable_products_follow_the_measured_costs():
    cost = CostModel()
    cost.timed(0.1, 0.0, 41, 0)
    assert cost.affordable(5.0) == 0  # a product timed at 0 s: nothing to scale by
    cost.timed(0.1, 0.02, 41, 0)
    assert cost.affordable(1.05) == 47  # (1.05 - 0.1) / 0.02 = 47.5
    cheap = CostModel()
    cheap.timed(0.1, 0.02, 41, 0)
    cheap.observe(0.2, 10)  # predicted 0.3 s: measurements cost 2/3 of the line, so 1 s buys what 1.5 s would
    assert cheap.affordable(1.05) == 73  # (1.575 - 0.1) / 0.02 = 73.75
    unknown = CostModel()
    unknown.timed(0.1, 0.02, 41, 0)
    unknown.observe(1.84, float("nan"))  # products not reported: counted as the most, 41 (0.92 s predicted)
    assert unknown.affordable(1.05) == 21  # scaled by 2: (0.525 - 0.1) / 0.02 = 21.25


def test_cost_model_state_keeps_the_extra_products_and_reads_older_states():
    cost = CostModel()
    cost.timed(0.1, 0.02, 41, 1)
    restored = CostModel()
    restored.load_state_dict(cost.state_dict())
    assert restored.extra == 1
    older = {k: v for k, v in cost.state_dict().items() if k != "extra"}
    restored.load_state_dict(older)
    assert restored.extra == 0


def test_steps_that_take_no_measurable_time_give_no_step_count_in_the_note():
    _, _, note = _fit(2000, step_time=lambda s: 0.0, steps=20)
    assert "the budget allows no measurement in this fit (needs 0.92 s, ?; budget 0 s:" in note
