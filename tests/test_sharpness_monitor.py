"""SharpnessMonitor in real Lightning runs (single process and 2-process gloo DDP)."""

from __future__ import annotations

import json
import math
import random
import time

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from dist import run_script
from pytorch_lightning.loggers import TensorBoardLogger
from scripts.sharpness_common import TinyNet, exact_hessian, loader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_opt.callbacks.sharpness import CALIBRATION_STEPS, CURVATURE_ATTR, SharpnessMonitor


def _trainer(tmp_path, callbacks, max_steps=6, logger=False):
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=logger, callbacks=callbacks,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, log_every_n_steps=50)


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _rel(a, b):
    return abs(a - b) / abs(b)


def test_monitor_logs_to_tensorboard_and_matches_exact_hessian(tmp_path):
    pl.seed_everything(0)
    model = TinyNet()
    mon = SharpnessMonitor(every_n_steps=3, probe="fixed", max_iter=120, tol=1e-3)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _trainer(tmp_path, [mon], max_steps=6, logger=logger)
    trainer.fit(model, loader())

    scalars = _scalars(logger.log_dir)
    for key in ("lambda_max", "lambda_min", "eos_ratio", "neg_pos_ratio", "two_over_lr", "smoothness",
                "smoothness_dHd", "L0", "L1", "advice_clip_lr", "advice_clip_threshold", "grad_norm", "matvecs"):
        # measured after optimizer steps 3 and 6, i.e. in training batches 2 and 5: Lightning's steps for them
        assert [s for s, _ in scalars[f"curvature/{key}"]] == [2, 5], key
    last = mon.last
    assert last["step"] == 6
    assert scalars["curvature/lambda_max"][-1][1] == pytest.approx(last["curvature/lambda_max"], rel=1e-6)

    # exact eigvalsh of the Hessian of the fixed probe batch at the final weights (eval-mode BN, no dropout)
    ev = torch.linalg.eigvalsh(exact_hessian(model, mon._fixed.batch))
    lmax, lmin = last["curvature/lambda_max"], last["curvature/lambda_min"]
    assert last["curvature/converged"] == 1.0
    assert _rel(lmax, ev[-1].item()) <= 1e-3
    assert _rel(lmin, ev[0].item()) <= 1e-3
    assert last["curvature/eos_ratio"] == pytest.approx(lmax * 0.05 / 2)
    assert last["curvature/two_over_lr"] == pytest.approx(40.0)
    assert last["curvature/neg_pos_ratio"] == pytest.approx(max(0.0, -lmin) / lmax)
    assert math.isfinite(last["curvature/smoothness"]) and last["curvature/smoothness"] > 0
    assert getattr(trainer, CURVATURE_ATTR) == {"lambda_max": lmax, "lambda_min": lmin, "step": 6}
    # the second measurement was warm-started from the first one's Ritz vectors
    assert mon.history[1]["curvature/matvecs"] < mon.history[0]["curvature/matvecs"]


def _run(tmp_path, callbacks, seed=0):
    pl.seed_everything(seed)
    model = TinyNet(dropout=0.3)
    trainer = _trainer(tmp_path, callbacks, max_steps=8)
    trainer.fit(model, loader(batch_size=16))
    return model


@pytest.mark.parametrize("bn_mode, dropout_mode, probe", [("train", "train", "current"), ("eval", "eval", "fixed")])
def test_training_with_and_without_monitor_is_identical(tmp_path, bn_mode, dropout_mode, probe):
    ref = _run(tmp_path / "a", [])
    mon = SharpnessMonitor(every_n_steps=2, probe=probe, max_iter=30, bn_mode=bn_mode, dropout_mode=dropout_mode)
    got = _run(tmp_path / "b", [mon])
    assert len(mon.history) == 4
    ref_state, got_state = ref.state_dict(), got.state_dict()
    for k in ref_state:
        assert torch.equal(ref_state[k], got_state[k]), k


def test_measure_restores_model_state():
    torch.manual_seed(0)
    model = TinyNet(dropout=0.5)
    model.train()
    model.net[1].eval()  # a mixed mode pattern must come back exactly
    x, y = next(iter(loader()))
    model.training_step((x, y), 0).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    params = [p.detach().clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    random.seed(1)
    np.random.seed(1)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    prev = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) + 0.01
    mon = SharpnessMonitor(every_n_steps=1, bn_mode="train", dropout_mode="train", max_iter=20)
    out = mon.measure(model, (x, y), lr=0.1, prev_params=prev)
    assert math.isfinite(out["curvature/lambda_max"]) and math.isfinite(out["curvature/smoothness"])
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers, strict=True))
    assert all(torch.equal(p, c) for p, c in zip(model.parameters(), params, strict=True))
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])


def test_state_dict_round_trip_warm_starts(tmp_path):
    pl.seed_everything(0)
    model = TinyNet()
    mon = SharpnessMonitor(every_n_steps=2, max_iter=100)
    _trainer(tmp_path, [mon], max_steps=4).fit(model, loader())
    state = mon.state_dict()
    assert state["ritz"].shape == (2, sum(p.numel() for p in model.parameters()))
    x_fixed = mon._fixed.batch[0]
    assert torch.equal(state["probe_batches"][0][0], x_fixed)

    restored = SharpnessMonitor(every_n_steps=2, max_iter=100)
    restored.load_state_dict(state)
    probe = restored._fixed.take_loaded(model)
    assert torch.equal(probe[0], x_fixed)
    warm = restored.measure(model, probe, lr=0.05)
    cold = SharpnessMonitor(every_n_steps=2, max_iter=100).measure(model, probe, lr=0.05)
    assert warm["curvature/lambda_max"] == pytest.approx(cold["curvature/lambda_max"], rel=1e-3)
    assert warm["curvature/matvecs"] < cold["curvature/matvecs"]
    assert restored.fit.n == mon.fit.n + 1


def test_manual_optimisation_needs_loss_fn(tmp_path):
    class Manual(TinyNet):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="loss_fn"):
        _trainer(tmp_path, [SharpnessMonitor()], max_steps=1).fit(Manual(), loader())


@pytest.mark.parametrize("kwargs, match", [
    ({"every_n_steps": 0}, "every_n_steps"), ({"every_n_steps": 2.0}, "every_n_steps"),
    ({"probe": "random"}, "probe"), ({"max_iter": 1}, "max_iter"), ({"tol": 0}, "tol"), ({"tol": 1.0}, "tol"),
    ({"bn_mode": "frozen"}, "bn_mode"), ({"smoothness": 1}, "smoothness"), ({"dropout_mode": "off"}, "dropout_mode"),
    ({"loss_fn": 3}, "loss_fn"), ({"hvp_method": "jvp"}, "hvp_method"),
    ({"hvp_method": "func", "bn_mode": "train"}, "hvp_method"), ({"ddp_mode": "mean"}, "ddp_mode"),
    ({"warm_start": "yes"}, "warm_start"), ({"fit_on": "lambda"}, "fit_on"),
    ({"fit_on": "smoothness", "smoothness": False}, "fit_on"), ({"fit_decay": 0.0}, "fit_decay"),
    ({"fit_decay": 1.5}, "fit_decay"), ({"seed": -1}, "seed"), ({"prefix": ""}, "prefix"),
    ({"max_overhead": 0.0}, "max_overhead"), ({"max_overhead": 1.0}, "max_overhead"),
    ({"every_n_steps": 5, "max_overhead": 0.1}, "max_overhead"),
])
def test_monitor_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SharpnessMonitor(**kwargs)


def test_two_process_ddp(out_dir):
    run_script("sharpness_ddp.py", "--out", out_dir, timeout=180)
    r0, r1 = (json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1))
    # global mode: Hessian of the global-batch loss, identical on both ranks, equal to the exact one
    # (the second measurement is warm-started; when the two smallest eigenvalues lie within ~1e-3 of each other
    # a warm start may stop on the second one, so accuracy is checked on the spectral scale ‖H‖ here)
    for r in (r0, r1):
        assert r["global"]["curvature/mode_global"] == 1.0
        scale = max(abs(v) for v in r["exact_global"])
        assert abs(r["global"]["curvature/lambda_max"] - r["exact_global"][1]) <= 1e-3 * scale
        assert abs(r["global"]["curvature/lambda_min"] - r["exact_global"][0]) <= 2e-3 * scale
    for k in ("lambda_max", "lambda_min", "matvecs", "grad_norm", "L0", "L1"):
        assert r0["global"][f"curvature/{k}"] == r1["global"][f"curvature/{k}"], k
    # local mode: per-rank Hessians (different probe batches), mean / extremes over ranks logged
    exact_max = [r0["exact_local"][1], r1["exact_local"][1]]
    exact_min = [r0["exact_local"][0], r1["exact_local"][0]]
    assert exact_max[0] != pytest.approx(exact_max[1], rel=1e-3)
    loc = r0["local"]
    assert loc["local/mode_global"] == 0.0
    scale = max(max(exact_max), -min(exact_min))
    assert abs(loc["local/lambda_max"] - sum(exact_max) / 2) <= 1e-3 * scale
    assert abs(loc["local/lambda_min"] - sum(exact_min) / 2) <= 2e-3 * scale
    assert abs(loc["local/lambda_max_rank_max"] - max(exact_max)) <= 1e-3 * scale
    assert abs(loc["local/lambda_min_rank_min"] - min(exact_min)) <= 2e-3 * scale
    assert r0["published"] == r1["published"]
    # only rank 0 wrote TensorBoard events; they hold both monitors' series
    scalars = _scalars(r0["log_dir"])
    # measured after optimizer steps 2 and 4 (training batches 1 and 3): logged at Lightning's steps for them
    assert [s for s, _ in scalars["curvature/lambda_max"]] == [1, 3]
    assert [s for s, _ in scalars["local/lambda_max"]] == [1, 3]
    assert scalars["curvature/lambda_max"][-1][1] == pytest.approx(r0["global"]["curvature/lambda_max"], rel=1e-6)
    assert r1["event_files_rank1"] == 0
    # checkpoint holds every rank's fixed probe batch
    assert r0["ckpt_probe_batches"] == 2 and r0["ckpt_probes_differ"]


class SlowNet(TinyNet):
    """TinyNet whose training step takes ≥ 10 ms, so a measurement costs a few steps (as on a real model)."""

    def training_step(self, batch, batch_idx):
        time.sleep(0.01)
        return super().training_step(batch, batch_idx)


_SCHEDULE = "lightning_opt.callbacks._sharpness_schedule"


def _said(monkeypatch) -> list[str]:
    """What the schedule tells the user (INFO notes and warnings), in order."""
    said = []
    for name in ("rank_zero_info", "rank_zero_warn"):
        monkeypatch.setattr(f"{_SCHEDULE}.{name}", said.append)
    return said


def _endless(monkeypatch) -> None:
    """Lightning cannot tell the fit's length (as with ``max_epochs=-1``): the schedule without a forecast."""
    monkeypatch.setattr(pl.Trainer, "estimated_stepping_batches", property(lambda self: float("inf")))


class _StopAt(pl.Callback):
    """Ends the fit after optimizer step ``step`` (a fit interrupted before its ``max_steps``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@pytest.mark.parametrize("length", ["known", "endless"])
def test_cost_aware_default_keeps_the_monitor_within_its_budget(tmp_path, monkeypatch, length):
    if length == "endless":
        _endless(monkeypatch)
    pl.seed_everything(0)
    mon = SharpnessMonitor(max_overhead=0.2, max_iter=30)
    assert mon.every_n_steps is None
    logger = TensorBoardLogger(tmp_path, name="tb")
    _trainer(tmp_path, [mon], max_steps=150, logger=logger).fit(SlowNet(), loader())
    steps = [int(h["step"]) for h in mon.history]
    assert len(steps) >= 4, steps  # a measurement costs a few 10 ms steps: the budget allows many
    # every measurement ran exactly at the step the previous one planned (and logged)
    assert [int(h["curvature/next_step"]) for h in mon.history[:-1]] == steps[1:]
    overhead = [h["curvature/overhead"] for h in mon.history]
    if length == "known":
        # spread over the 150 steps: the first right after the calibration (5% of the fit is step 8)
        assert steps[0] == CALIBRATION_STEPS + 1
    else:
        assert steps[0] > CALIBRATION_STEPS  # calibration first, then the first affordable step
        # the share right after a measurement is about the budget (a measurement slower than the last one, whose
        # cost the plan assumed, overshoots once; the next plans pay it back)
        assert sorted(overhead)[len(overhead) // 2] <= 0.3, overhead
    assert 0.0 < mon._budget.share() <= 0.3
    assert mon._budget.share() >= 0.05  # and the schedule does use the budget (not vacuously cheap)
    scalars = _scalars(logger.log_dir)
    assert [s for s, _ in scalars["curvature/overhead"]] == [s - 1 for s in steps]  # Lightning's step: batch index


def test_a_fit_the_budget_cannot_pay_for_says_so_once(tmp_path, monkeypatch):
    warned, info = [], []
    monkeypatch.setattr(f"{_SCHEDULE}.rank_zero_warn", warned.append)
    monkeypatch.setattr(f"{_SCHEDULE}.rank_zero_info", info.append)
    mon = SharpnessMonitor(max_overhead=0.001)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _trainer(tmp_path, [mon], max_steps=40, logger=logger)
    trainer.fit(TinyNet(), loader())
    assert mon.history == [] and mon._budget.next_step == 41  # past the fit's last step
    assert len(warned) == 1 and "the budget allows no measurement in this fit (needs " in warned[0]
    assert info == []  # the end of the fit does not say it again
    assert trainer.progress_bar_metrics["sharpness"].startswith("no measurement in this fit (needs ")
    acc = EventAccumulator(str(logger.log_dir))
    acc.Reload()
    assert "curvature/schedule/text_summary" in acc.Tags()["tensors"]


def test_cost_aware_default_defers_an_unaffordable_measurement(tmp_path, monkeypatch):
    _endless(monkeypatch)
    messages = _said(monkeypatch)
    mon = SharpnessMonitor(max_overhead=0.001)
    _trainer(tmp_path, [mon], max_steps=40).fit(TinyNet(), loader())
    assert mon.history == []
    assert mon._budget.next_step > 40
    assert len(messages) == 2 and f"first one runs at step {mon._budget.next_step}" in messages[0]
    assert "no measurement in this fit" in messages[1] and f"step {mon._budget.next_step}" in messages[1]


def test_cost_aware_schedule_says_when_a_fit_is_too_short_to_calibrate(tmp_path, monkeypatch):
    messages = _said(monkeypatch)
    mon = SharpnessMonitor()
    _trainer(tmp_path, [mon], max_steps=CALIBRATION_STEPS - 1).fit(TinyNet(), loader())
    assert mon.history == [] and mon._budget.next_step is None
    assert len(messages) == 1 and f"calibrates after {CALIBRATION_STEPS} steps" in messages[0]


def test_cost_aware_schedule_resumes_from_a_checkpoint(tmp_path, monkeypatch):
    _endless(monkeypatch)
    messages = _said(monkeypatch)
    pl.seed_everything(0)
    mon = SharpnessMonitor(max_overhead=0.2, max_iter=20)
    trainer = _trainer(tmp_path, [mon], max_steps=30)
    trainer.fit(SlowNet(), loader())
    assert any("estimated at" in m for m in messages)  # calibrated in the first fit
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    planned, spent = mon._budget.next_step, mon._budget.spent
    assert planned > 30

    messages.clear()
    resumed = SharpnessMonitor(max_overhead=0.2, max_iter=20)
    _trainer(tmp_path, [resumed], max_steps=planned + 2).fit(SlowNet(), loader(), ckpt_path=ckpt)
    assert not any("estimated at" in m for m in messages)  # no recalibration after a resume
    assert resumed.history[0]["step"] == planned  # the restored plan is kept
    assert resumed._budget.spent > spent  # the accounting continued


def test_a_resumed_fit_keeps_the_plan_made_for_its_length(tmp_path, monkeypatch):
    said = _said(monkeypatch)
    pl.seed_everything(0)
    mon = SharpnessMonitor(max_overhead=0.2, max_iter=20)
    trainer = _trainer(tmp_path, [mon, _StopAt(CALIBRATION_STEPS)], max_steps=1000)
    trainer.fit(SlowNet(), loader())  # interrupted right after the calibration
    assert mon.history == [] and any("fit to step 1000" in m for m in said)
    planned = mon._budget.next_step
    assert CALIBRATION_STEPS < planned <= 50  # the first within 5% of the 1000 steps
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)

    said.clear()
    resumed = SharpnessMonitor(max_overhead=0.2, max_iter=20)
    _trainer(tmp_path, [resumed, _StopAt(planned)], max_steps=1000).fit(SlowNet(), loader(), ckpt_path=ckpt)
    assert said == []  # no recalibration: the plan for step 1000 is kept
    assert [h["step"] for h in resumed.history] == [planned]

    shorter = SharpnessMonitor(max_overhead=0.2, max_iter=20)
    _trainer(tmp_path, [shorter, _StopAt(2 * CALIBRATION_STEPS)], max_steps=500).fit(SlowNet(), loader(),
                                                                                       ckpt_path=ckpt)
    assert any("fit to step 500" in m for m in said)  # another length: a plan for it, after a new calibration


def test_a_reused_monitor_starts_a_new_schedule_on_a_new_run(tmp_path, monkeypatch):
    messages = _said(monkeypatch)
    mon = SharpnessMonitor(max_overhead=0.5, max_iter=20)  # a large budget: measurements soon even under load
    _trainer(tmp_path, [mon], max_steps=40).fit(SlowNet(), loader())
    assert mon._budget._t0 is None  # the clock stopped with the fit
    measured = len(mon.history)
    messages.clear()
    _trainer(tmp_path, [mon], max_steps=40).fit(SlowNet(), loader())  # a fresh Trainer starts at step 0
    assert any("estimated at" in m for m in messages)  # recalibrated
    assert len(mon.history) > measured


def test_cost_aware_schedule_agrees_across_ranks_with_different_step_times(out_dir):
    run_script("sharpness_budget_ddp.py", "--out", out_dir, timeout=240)
    r0, r1 = (json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1))
    for key in ("global", "local"):
        assert r0[key] == r1[key], key  # the same measured steps on both ranks (no collective mismatch)
        assert len(r0[key]) >= 2, r0


class _FitThroughOrigin:
    """An (L0, L1) fit that came out as L0 = 0 (curvature proportional to the gradient norm): no advice exists."""

    def update(self, g, target):
        pass

    def fit(self):
        return 0.0, 0.5

    def advice(self):
        from lightning_opt.stats.smoothness import clipping_advice

        return clipping_advice(*self.fit())


def test_advice_without_a_value_is_left_out_not_logged_as_nan():
    model = TinyNet()
    batch = next(iter(loader()))
    mon = SharpnessMonitor(every_n_steps=1, max_iter=10)
    with_fit = mon.measure(model, batch, lr=0.1)
    assert all(math.isfinite(with_fit[f"curvature/{k}"]) for k in ("L0", "L1", "advice_clip_lr"))
    mon.fit = _FitThroughOrigin()
    out = mon.measure(model, batch, lr=0.1)
    assert out["curvature/L0"] == 0.0 and out["curvature/L1"] == 0.5
    assert "curvature/advice_clip_lr" not in out and "curvature/advice_clip_threshold" not in out


@pytest.mark.parametrize("save_probe", [True, False])
def test_checkpoints_hold_the_probe_batch_only_when_asked(tmp_path, save_probe):
    pl.seed_everything(0)
    mon = SharpnessMonitor(every_n_steps=2, max_iter=8, save_probe=save_probe)
    trainer = _trainer(tmp_path, [mon], max_steps=4)
    trainer.fit(TinyNet(), loader())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    (state,) = [v for k, v in torch.load(tmp_path / "a.ckpt", weights_only=False)["callbacks"].items()
                if "SharpnessMonitor" in k]
    if save_probe:
        assert torch.equal(state["probe_batches"][0][0], mon._fixed.batch[0])
    else:
        assert state["probe_batches"] is None  # no training data in the file
    resumed = SharpnessMonitor(every_n_steps=2, max_iter=8, save_probe=save_probe)
    # resume on batches of 16 rows: a probe of 32 rows can only have come from the checkpoint
    _trainer(tmp_path, [resumed], max_steps=6).fit(TinyNet(), loader(batch_size=16), ckpt_path=tmp_path / "a.ckpt")
    assert [h["step"] for h in resumed.history] == [6]
    assert len(resumed._fixed.batch[0]) == (32 if save_probe else 16)
