"""GradNormMonitor and GradientNoiseMonitor: logged values, trajectory invariance, 2-process gloo (their
constructor validation is in tests/test_bad_inputs.py)."""

from __future__ import annotations

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from dist import run_script
from scripts._common import CaptureLogger
from scripts.monitors_model import StatsSGD, TinyMLP, make_dataset
from torch.utils.data import DataLoader, IterableDataset

from lightning_opt.callbacks.grad_norm import GradNormMonitor
from lightning_opt.callbacks.gradient_noise import GradientNoiseMonitor

NOISE_KEYS = [
    "noise/norm", "noise/grad_sq", "noise/b_simple", "noise/b_simple_ema",
    *[f"noise/tail_alpha_{n}{s}" for n in ("coord", "sample", "hill") for s in ("", "_lo", "_hi")],
]


def fit(callbacks, *, steps=24, logger=None, seed=0, **model_kwargs):
    clip = model_kwargs.pop("clip", None)
    pl.seed_everything(seed, verbose=False)
    model = TinyMLP(**model_kwargs)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=logger or False, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        log_every_n_steps=1000,  # the monitors must log regardless of Lightning's own cadence
        gradient_clip_val=clip,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    return trainer, model


# ----------------------------------------------------------------------------------- single-process runs


def test_monitors_do_not_change_trajectory_and_log_everything():
    """Dropout (RNG), BatchNorm (buffers), a torchmetrics accumulator and self.log in training_step: with the
    probe-source and micro-source monitors the run is bit-identical to the plain run."""
    _, plain = fit([])
    rng_plain = torch.get_rng_state()

    cap = CaptureLogger()
    gnm = GradNormMonitor(every_n_steps=5, per_layer=True)
    noise = GradientNoiseMonitor(every_n_steps=10, num_batches=16, max_coords=256, bootstrap=50)
    trainer, probed = fit([gnm, noise], logger=cap, optimizer_cls=StatsSGD)
    rng_probed = torch.get_rng_state()

    _, micro = fit([GradientNoiseMonitor(every_n_steps=7, num_batches=4, source="micro", bootstrap=20)],
                   dict_output=True)

    for name, ref in plain.state_dict().items():
        torch.testing.assert_close(probed.state_dict()[name], ref, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(micro.state_dict()[name], ref, rtol=0, atol=0, msg=name)
    assert torch.equal(rng_plain, rng_probed)
    for m in (probed, micro):  # torchmetrics accumulators saw only the training batches
        assert m.train_loss_mean.weight.item() == plain.train_loss_mean.weight.item() == 24

    # GradNormMonitor: every 5th optimizer step, independent of log_every_n_steps
    assert cap.steps_with("grad/norm") == [0, 5, 10, 15, 20]
    layer_keys = [f"grad_layer/{n}" for n, _ in probed.named_parameters()]
    for _, metrics in cap.calls:
        if "grad/norm" in metrics:
            per = torch.tensor([metrics[k] for k in layer_keys])
            assert metrics["grad/norm"] == pytest.approx(per.norm().item(), rel=1e-5)
            assert metrics["grad/norm_max"] == metrics["grad/norm"]  # single process
            # last_stats of the optimizer, read after the step (StatsSGD reports the unclipped norm here)
            assert metrics["grad/post_clip_norm"] == pytest.approx(metrics["grad/norm"], rel=1e-5)
            assert metrics["grad/clip_fraction"] == pytest.approx(0.25)
    # GradientNoiseMonitor: probes at steps 0, 10, 20, all keys, the core ones finite
    assert cap.steps_with("noise/norm") == [0, 10, 20]
    last = {k: v for s, m in cap.calls if s == 20 for k, v in m.items()}
    assert set(NOISE_KEYS) <= set(last)
    for key in ("noise/norm", "noise/grad_sq", "noise/tail_alpha_coord", "noise/tail_alpha_sample"):
        assert math.isfinite(last[key]), key
    assert last["noise/norm"] > 0
    assert 0 < last["noise/tail_alpha_coord"] <= 2.5


def test_gradient_accumulation_probe_once_per_optimizer_step():
    def run(callbacks, logger=None):
        pl.seed_everything(0, verbose=False)
        model = TinyMLP()
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=6, accumulate_grad_batches=2,
                             logger=logger or False, callbacks=callbacks, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False)
        trainer.fit(model)
        return model

    plain = run([])
    cap = CaptureLogger()
    probed = run([GradientNoiseMonitor(every_n_steps=2, num_batches=4, bootstrap=0),
                  GradNormMonitor(every_n_steps=2)], cap)
    for name, ref in plain.state_dict().items():
        torch.testing.assert_close(probed.state_dict()[name], ref, rtol=0, atol=0, msg=name)
    assert cap.steps_with("noise/norm") == [0, 2, 4]
    assert cap.steps_with("grad/norm") == [0, 2, 4]
    assert not any("_lo" in k for _, m in cap.calls for k in m)  # bootstrap=0: no intervals


def test_grad_norm_is_pre_clip_and_post_clip_comes_from_last_stats():
    cap = CaptureLogger()
    fit([GradNormMonitor(every_n_steps=2)], steps=6, logger=cap, optimizer_cls=StatsSGD, clip=1e-3)
    pre = cap.values("grad/norm")
    post = cap.values("grad/post_clip_norm")
    assert len(pre) == len(post) == 3
    for a, b in zip(pre, post, strict=True):
        assert a > 1e-2  # unclipped gradient norm
        assert b == pytest.approx(1e-3, rel=1e-3)  # what the optimizer stepped with


def test_inf_norm_and_every_step():
    cap = CaptureLogger()
    fit([GradNormMonitor(every_n_steps=1, norm_type=float("inf"))], steps=3, logger=cap)
    assert cap.steps_with("grad/norm") == [0, 1, 2]
    assert all(0 < v < 10 for v in cap.values("grad/norm"))


def test_micro_source_too_small_batch_warns_and_skips():
    cap = CaptureLogger()
    with pytest.warns(UserWarning, match="cannot be split"):
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=cap, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False,
                             callbacks=[GradientNoiseMonitor(every_n_steps=1, num_batches=8, source="micro")])
        trainer.fit(TinyMLP(batch_size=4))
    assert cap.steps_with("noise/norm") == []


class _Stream(IterableDataset):
    def __iter__(self):
        ds = make_dataset(64)
        return iter(ds[i] for i in range(len(ds)))


class _StreamMLP(TinyMLP):
    def train_dataloader(self):
        return DataLoader(_Stream(), batch_size=16)


def test_probe_source_needs_map_style_dataset():
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[GradientNoiseMonitor(every_n_steps=1)])
    with pytest.raises(RuntimeError, match="map-style"):
        trainer.fit(_StreamMLP())


def test_noise_monitor_state_round_trip():
    a = GradientNoiseMonitor()
    a.load_state_dict({"last_probe_step": 40, "ema_trace": 1.5, "ema_grad_sq": 0.25, "ema_weight": 0.19})
    b = GradientNoiseMonitor()
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()


# ----------------------------------------------------------------------------------- two processes (gloo)


def test_monitors_under_two_process_ddp(out_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_script("monitors_ddp.py", "--out", out_dir, timeout=180)
    r0, r1 = (torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == 2 and r0["pid"] != r1["pid"]
    # probes and norm logging do not change the DDP trajectory (parameters and buffers, on both ranks)
    for r in (r0, r1):
        for name, ref in r["plain"].items():
            torch.testing.assert_close(r["monitored"][name], ref, rtol=0, atol=0, msg=name)
    for name, ref in r0["plain"].items():
        if "running" not in name:  # BatchNorm statistics are per rank under DDP
            torch.testing.assert_close(r1["plain"][name], ref, rtol=0, atol=0, msg=name)

    # real TensorBoard event files written by rank 0
    ea = EventAccumulator(r0["tb_dir"], size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    expected = set(NOISE_KEYS) | {"grad/norm", "grad/norm_max", "grad/post_clip_norm", "grad/clip_fraction",
                                  "grad_layer/net.0.weight"}
    assert expected <= scalars, expected - scalars
    for tag in expected:
        events = ea.Scalars(tag)
        assert events, tag
        # upper bounds may be NaN (unbounded: some resamples give 1/α̂ ≤ 0) with only 16 gradients
        if tag not in ("noise/tail_alpha_hill_hi", "noise/tail_alpha_sample_hi"):
            assert all(math.isfinite(e.value) for e in events), (tag, [e.value for e in events])
    assert [e.step for e in ea.Scalars("noise/norm")] == [0, 5, 10]
    assert [e.step for e in ea.Scalars("grad/norm")] == [0, 4, 8]
    hist = ea.Histograms("noise/norms")
    assert [h.step for h in hist] == [0, 5, 10]
    assert all(h.histogram_value.num == 16 for h in hist)  # 8 probe gradients × 2 ranks

    # local (rank-dependent) gradients: mean and max over ranks
    true = r0["scaled_true_norms"][-1]
    assert r0["scaled_metrics"]["grad/norm"] == pytest.approx(1.5 * true, rel=1e-5)
    assert r0["scaled_metrics"]["grad/norm_max"] == pytest.approx(2.0 * true, rel=1e-5)
