"""Monitors checked by value (issue #27): what GradientNoiseMonitor, SharpnessMonitor and TimeAverageMonitor log
equals the ``lightning_opt.stats`` functions applied to the data the monitor saw (recorded in the test), and an
independent float64 formula written here. Single process, real ``Trainer.fit`` on a 39-parameter float64 MLP."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from scripts._common import CaptureLogger
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

import lightning_opt.callbacks
from lightning_opt.callbacks.gradient_noise import GradientNoiseMonitor
from lightning_opt.stats.noise import noise_moments, pool_noise
from lightning_opt.stats.tail_index import (
    tail_index_hill,
    tail_index_hill_ci,
    tail_index_mohammadi,
    tail_index_mohammadi_ci,
)

D_IN, HIDDEN, CLASSES = 5, 4, 3


def _data(n: int, seed: int = 0) -> TensorDataset:
    """Student-t(3) inputs (heavy-ish tails), 3 classes."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    chi = torch.randn(n, 3, generator=g, dtype=torch.float64).square().sum(1, keepdim=True) / 3
    x = z / chi.sqrt()
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 0.8).long()
    return TensorDataset(x.float(), y)


class Net(pl.LightningModule):
    """tanh MLP 5 → 4 → 3 (39 parameters), cross-entropy, no BatchNorm / dropout: the loss is a plain function of
    (θ, batch). Every ``training_step`` call records its batch in ``calls``."""

    def __init__(self, *, n: int = 96, batch_size: int = 8, lr: float = 0.3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))
        self.n, self.batch_size, self.lr = n, batch_size, lr
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.calls.append((x.detach().clone(), y.detach().clone()))
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(_data(self.n), batch_size=self.batch_size, shuffle=False)


class Bracket(pl.Callback):
    """Put before and after a monitor in ``callbacks``: records, at ``on_train_batch_start``, the step, the number
    of ``training_step`` calls so far, the weights and the training batch — the calls between the two brackets
    of one step are the monitor's probe calls."""

    def __init__(self) -> None:
        self.marks: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.marks.append({"step": trainer.global_step, "calls": len(pl_module.calls),
                           "state": copy.deepcopy(pl_module.state_dict()),
                           "batch": [t.detach().clone() for t in batch]})


def _fit(model, callbacks, max_steps, logger=None, **kw):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=logger or False,
                         callbacks=callbacks, precision="64-true", enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    return trainer


def _batch_gradients(model: Net, state: dict, batches) -> torch.Tensor:
    """[M, D] float64 gradients of the mean cross-entropy of each batch at the weights ``state``."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: state[n].detach().double().clone().requires_grad_(True) for n in names}
    rows = []
    for x, y in batches:
        loss = F.cross_entropy(functional_call(model.net, {k[len("net."):]: v for k, v in params.items()},
                                               (x.double(),)), y)
        grads = torch.autograd.grad(loss, list(params.values()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


# ----------------------------------------------------------------------------------- independent estimators


def mohammadi_ref(series: np.ndarray, k1: int) -> float:
    """Mohammadi et al. 2015, Cor. 2.4, per series and pooled: 1/α̂ = mean_c[(1/K2) Σ_j log|Y_jc| −
    (1/K) Σ_i log|X_ic|] / log K1, Y_jc the sums of K1 consecutive X_ic (a trailing partial block dropped).
    ``series`` is [n] (one series) or [n, C]; no zeros expected."""
    s = series.reshape(series.shape[0], -1)
    k2 = s.shape[0] // k1
    blocks = s[: k1 * k2].reshape(k2, k1, -1)
    diff = np.log(np.abs(blocks.sum(1))).mean(0) - np.log(np.abs(blocks)).mean((0, 1))
    return 1.0 / (diff.mean() / math.log(k1))


def hill_ref(x: np.ndarray, k: int) -> float:
    """Hill 1975: 1/α̂ = (1/k) Σ_{i≤k} log X_(i) − log X_(k+1), X_(1) ≥ X_(2) ≥ … of |x|."""
    s = np.sort(np.abs(x.reshape(-1)))[::-1]
    return 1.0 / (np.log(s[:k]).mean() - math.log(s[k]))


def _finite(expected: dict[str, float]) -> None:
    bad = [k for k, v in expected.items() if not math.isfinite(v)]
    assert not bad, f"the setting must give finite reference values (else the check is vacuous): {bad}"


# ------------------------------------------------------------------------------------------ GradientNoiseMonitor


def _noise_reference(g64: torch.Tensor, bsz: int, mon: GradientNoiseMonitor, step: int) -> dict[str, float]:
    """What the monitor must log for the M gradients ``g64`` [M, D] (one rank; max_coords ≥ D, so every coordinate
    is gathered, in index order): the ``lightning_opt.stats`` estimators on the float32 gradients the monitor
    holds, along the documented axes — ξ flattened sample by sample (coord), the pair differences
    ξ_{2j} − ξ_{2j+1} with the sample axis dim=0 (sample), the noise norms (Hill); the intervals drawn in that
    order from the step's bootstrap generator (seeded by the monitor's private ``_seed_for(step, 3)``)."""
    m = g64.shape[0]
    mom = noise_moments(g64.float())  # the monitor's buffer is float32; centred in place
    xi = (g64.float() - g64.float().mean(0)).double()
    pairs = xi[0 : 2 * (m // 2) : 2] - xi[1 : 2 * (m // 2) : 2]
    summ = pool_noise(mom.sum_sq, mom.mean_sq, m, bsz)
    out = {"noise/norm": summ.sigma.item(), "noise/grad_sq": summ.grad_sq.item(),
           "noise/b_simple": summ.b_simple.item()}
    kw = {"num_resamples": mon.bootstrap, "level": mon.level}
    gen = torch.Generator().manual_seed(mon._seed_for(step, 3, with_rank=False))
    if mon.bootstrap:
        est = {"coord": tail_index_mohammadi_ci(xi, mon.block, generator=gen, max_alpha=mon.max_alpha, **kw),
               "sample": tail_index_mohammadi_ci(pairs, mon.sample_block, dim=0, generator=gen,
                                                 max_alpha=mon.max_alpha, **kw),
               "hill": tail_index_hill_ci(mom.norms, mon.hill_k, generator=gen, **kw)}
        for name, e in est.items():
            out |= {f"noise/tail_alpha_{name}": e.alpha.item(), f"noise/tail_alpha_{name}_lo": e.lo.item(),
                    f"noise/tail_alpha_{name}_hi": e.hi.item()}
    else:
        out |= {"noise/tail_alpha_coord": tail_index_mohammadi(xi, mon.block, max_alpha=mon.max_alpha).item(),
                "noise/tail_alpha_sample": tail_index_mohammadi(pairs, mon.sample_block, dim=0,
                                                                max_alpha=mon.max_alpha).item(),
                "noise/tail_alpha_hill": tail_index_hill(mom.norms, mon.hill_k).item()}
    return out


def _noise_formulas(g64: torch.Tensor, bsz: int, block: int, sample_block: int, hill_k: int) -> dict[str, float]:
    """Independent float64 formulas: σ² = Σ_i ‖g_i − ḡ‖²/(M − 1) (thesis eq. (6.2)), |G|² = ‖ḡ‖² − σ²/M and
    B_simple = b·σ²/|G|² (McCandlish et al. 2018, App. A.1 / eq. (2.8)); the tail indices by ``mohammadi_ref``
    and ``hill_ref`` on the float32-centred noise the monitor holds."""
    m = g64.shape[0]
    xi64 = g64 - g64.mean(0)
    trace = xi64.square().sum().item() / (m - 1)
    grad_sq = g64.mean(0).square().sum().item() - trace / m
    xi32 = g64.float() - g64.float().mean(0)
    norms = torch.linalg.vector_norm(xi32, dim=1).double().numpy()  # float32 norms, as the monitor holds them
    xi = xi32.double().numpy()
    pairs = xi[0 : 2 * (m // 2) : 2] - xi[1 : 2 * (m // 2) : 2]
    return {"noise/norm": math.sqrt(trace), "noise/grad_sq": grad_sq, "noise/b_simple": bsz * trace / grad_sq,
            "trace": trace,
            "noise/tail_alpha_coord": mohammadi_ref(xi.reshape(-1), block),
            "noise/tail_alpha_sample": mohammadi_ref(pairs, sample_block),
            "noise/tail_alpha_hill": hill_ref(norms, hill_k)}


def _check_noise_run(model, mon, opened, closed, cap, probe_batches, bsz, every, n_probes, refs):
    """Shared by the two source tests: logged == stats on the recorded gradients == the float64 formulas;
    ``b_simple_ema`` == ratio of the EMAs of tr(Σ_b) and |G|² with decay ``ema_decay``."""
    assert cap.steps_with("noise/norm") == [every * i for i in range(n_probes)]
    probed = [(a, b) for a, b in zip(opened.marks, closed.marks, strict=True) if b["calls"] > a["calls"]]
    assert [a["step"] for a, _ in probed] == cap.steps_with("noise/norm")
    ema_tr = ema_g = 0.0
    d = mon.ema_decay
    for a, b in probed:
        step = a["step"]
        batches = probe_batches(a, model.calls[a["calls"] : b["calls"]])
        assert len(batches) == mon.num_batches
        g64 = _batch_gradients(model, a["state"], batches)
        logged = {k: v for s, met in cap.calls if s == step for k, v in met.items()}
        want = _noise_reference(g64, bsz, mon, step)
        _finite(want)
        assert set(logged) == set(want) | {"noise/b_simple_ema"}
        for key, value in want.items():
            assert logged[key] == pytest.approx(value, rel=1e-12, abs=0), (step, key)
        f = _noise_formulas(g64, bsz, *refs)
        for key in ("noise/norm", "noise/grad_sq", "noise/b_simple"):
            assert logged[key] == pytest.approx(f[key], rel=1e-5), (step, key)
        for key in ("noise/tail_alpha_coord", "noise/tail_alpha_sample", "noise/tail_alpha_hill"):
            assert logged[key] == pytest.approx(f[key], rel=1e-9), (step, key)
        ema_tr, ema_g = d * ema_tr + (1 - d) * f["trace"], d * ema_g + (1 - d) * f["noise/grad_sq"]
        assert logged["noise/b_simple_ema"] == pytest.approx(bsz * ema_tr / ema_g, rel=1e-5)  # bias weights cancel


def test_noise_monitor_probe_source_logs_the_stats_of_its_probe_gradients():
    """source='probe', bootstrap on: M = 12 independent batches of 6 rows (training batches have 8), non-default
    blocks, k and max_alpha; three probes so the EMA ratio differs from B_simple."""
    cap, model = CaptureLogger(), Net(batch_size=8)
    mon = GradientNoiseMonitor(every_n_steps=3, num_batches=12, bootstrap=40, level=0.8, block=5, sample_block=3,
                               hill_k=4, batch_size=6, ema_decay=0.7, max_alpha=8.0, seed=5)
    opened, closed = Bracket(), Bracket()
    _fit(model, [opened, mon, closed], 7, logger=cap)
    data = _data(model.n).tensors[0].double()

    def probe_batches(mark, calls):
        for x, _ in calls:  # b distinct rows of the training set
            assert x.shape == (6, D_IN)
            rows = [int(torch.nonzero((data == r).all(1)).item()) for r in x]
            assert len(set(rows)) == 6
        return calls

    _check_noise_run(model, mon, opened, closed, cap, probe_batches, 6, 3, 3, (5, 3, 4))


def test_noise_monitor_micro_source_splits_the_training_batch():
    """source='micro', no bootstrap (the point-estimate path), default blocks and k: M = 7 micro-batches of
    ⌊23/7⌋ = 3 rows of the current training batch (2 rows dropped), an odd M (the last ξ has no pair)."""
    cap, model = CaptureLogger(), Net(batch_size=23, n=92)
    mon = GradientNoiseMonitor(every_n_steps=2, num_batches=7, source="micro", bootstrap=0, ema_decay=0.5,
                               max_alpha=6.0)
    opened, closed = Bracket(), Bracket()
    _fit(model, [opened, mon, closed], 4, logger=cap)

    def probe_batches(mark, calls):
        x, y = mark["batch"]
        mine = [(x[3 * i : 3 * i + 3], y[3 * i : 3 * i + 3]) for i in range(7)]
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(mine, calls, strict=True))
        return mine

    # defaults: block ⌊√(7·39)⌋ = 16, sample_block max(2, ⌊√3⌋) = 2, hill_k ⌊√7⌋ = 2
    _check_noise_run(model, mon, opened, closed, cap, probe_batches, 3, 2, 2, (16, 2, 2))


# ------------------------------------------------------------------------------------------------ SharpnessMonitor


class Trace(pl.Callback):
    """Flat weights before (``on_train_batch_start``) and after (``on_train_batch_end``) every step, and the
    training batches."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []
        self.batches: list[list[torch.Tensor]] = []

    @staticmethod
    def _flat(module):
        return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append(self._flat(pl_module))
        self.batches.append([t.detach().clone() for t in batch])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(self._flat(pl_module))


def _flat_loss(model: Net, batch):
    """θ ↦ mean cross-entropy of ``batch`` at the flat float64 weights θ (functional, the module is untouched)."""
    x, y = batch
    shapes = [(n, p.shape) for n, p in model.net.named_parameters()]

    def f(theta):
        params, i = {}, 0
        for n, shape in shapes:
            k = math.prod(shape)
            params[n] = theta[i : i + k].reshape(shape)
            i += k
        return F.cross_entropy(functional_call(model.net, params, (x.double(),)), y)

    return f


def _grad(f, theta):
    t = theta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(t), t)
    return g


def _l0l1_reference(points: list[tuple[float, float]], decay: float) -> tuple[float, float]:
    """Weighted least squares L̂ ≈ L0 + L1·‖∇f‖ (thesis Def. 3.2.1) with weights decay^(n−1−j), constrained to
    L0, L1 ≥ 0: a negative slope gives the weighted mean (L1 = 0), a negative intercept the line through 0."""
    x, y = (np.array(v, dtype=np.float64) for v in zip(*points, strict=True))
    w = decay ** np.arange(len(x) - 1, -1, -1, dtype=np.float64)
    if len(x) < 2:
        return max(float(y[0]), 0.0), 0.0
    sw = np.sqrt(w)
    (l0, l1), *_ = np.linalg.lstsq(np.stack([sw, sw * x], 1), sw * y, rcond=None)
    if l1 < 0:
        return max(float((w * y).sum() / w.sum()), 0.0), 0.0
    if l0 < 0:
        return 0.0, max(float((w * x * y).sum() / (w * x * x).sum()), 0.0)
    return float(l0), float(l1)


@pytest.mark.parametrize("probe", ["fixed", "current"])
def test_sharpness_monitor_logs_the_extreme_eigenvalues_of_the_exact_hessian(probe):
    """λ_max, λ_min within the documented relative ``tol`` of eigvalsh of the explicit float64 Hessian
    (torch.autograd.functional.hessian) of the probe batch's loss at the weights after the measured step
    (max_iter 30 < 39 parameters: Lanczos must converge, not exhaust the space); the derived keys by their
    formulas (eos ratio λ_max·η/2, L⁻/λ_max, smoothness ‖∇f(x_{t+1}) − ∇f(x_t)‖/‖d‖ and dᵀHd/‖d‖² along the
    last update, the decayed (L0, L1) fit on max(|λ_max|, |λ_min|) and Thm 3.4.1's advice)."""
    from lightning_opt.callbacks.sharpness import SharpnessMonitor

    lr, tol, decay = 0.1, 1e-7, 0.7
    cap, model, trace = CaptureLogger(), Net(batch_size=6, lr=lr, seed=1), Trace()
    mon = SharpnessMonitor(every_n_steps=2, probe=probe, max_iter=30, tol=tol, fit_decay=decay, seed=3)
    _fit(model, [trace, mon], 6, logger=cap)
    assert cap.steps_with("curvature/lambda_max") == [1, 3, 5]  # after optimizer steps 2, 4, 6: batches 1, 3, 5
    points = []
    for step in (2, 4, 6):
        logged = {k: v for s, met in cap.calls if s == step - 1 for k, v in met.items()}
        theta, prev = trace.after[step - 1].double(), trace.before[step - 1].double()
        f = _flat_loss(model, trace.batches[0 if probe == "fixed" else step - 1])
        hess = torch.autograd.functional.hessian(f, theta)
        ev = torch.linalg.eigvalsh(hess)
        lmax, lmin = ev[-1].item(), ev[0].item()
        assert lmin < 0 < lmax  # a saddle region: λ_min and the ratio carry information
        assert logged["curvature/converged"] == 1.0 and logged["curvature/matvecs"] <= 31
        assert abs(logged["curvature/lambda_max"] - lmax) <= tol * abs(lmax), step
        assert abs(logged["curvature/lambda_min"] - lmin) <= tol * abs(lmin), step
        assert logged["curvature/eos_ratio"] == pytest.approx(lmax * lr / 2, rel=2 * tol)
        assert logged["curvature/two_over_lr"] == 2 / lr
        assert logged["curvature/neg_pos_ratio"] == pytest.approx(-lmin / lmax, rel=3 * tol)
        g, g_prev = _grad(f, theta), _grad(f, prev)
        d = theta - prev
        assert logged["curvature/grad_norm"] == pytest.approx(g.norm().item(), rel=1e-12)
        assert logged["curvature/probe_loss"] == pytest.approx(f(theta).item(), rel=1e-12)
        assert logged["curvature/smoothness"] == pytest.approx(((g - g_prev).norm() / d.norm()).item(), rel=1e-9)
        assert logged["curvature/smoothness_dHd"] == pytest.approx((d @ hess @ d / (d @ d)).item(), rel=1e-9)
        points.append((g.norm().item(), max(abs(lmax), abs(lmin))))
        l0, l1 = _l0l1_reference(points, decay)
        assert logged["curvature/L0"] == pytest.approx(l0, rel=1e-5, abs=1e-12), step
        assert logged["curvature/L1"] == pytest.approx(l1, rel=1e-5, abs=1e-12), step
        if l0 == 0:  # η_c = 1/(10 L0) has no value: left out, not logged as NaN
            assert "curvature/advice_clip_lr" not in logged and "curvature/advice_clip_threshold" not in logged
            continue
        eta_c = 1 / (10 * l0)
        gamma = 1 / eta_c if l1 == 0 else min(1 / eta_c, 1 / (10 * l1 * eta_c))
        assert logged["curvature/advice_clip_lr"] == pytest.approx(eta_c, rel=1e-5)
        assert logged["curvature/advice_clip_threshold"] == pytest.approx(gamma, rel=1e-5)


# ----------------------------------------------------------------------------------------------- TimeAverageMonitor


class PhasedNet(Net):
    """Net with StepLR(5, ½) stepped every optimizer step (lr phases 0.5 / 0.25 / 0.125), logging ``train/loss``
    every step and ``aux`` = 10·loss + t on steps t = 1, 4, 7, … only (a sampled-and-held metric).
    Records (lr, loss) of each training step."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.steps: list[tuple[float, float]] = []
        self.aux: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        t = self.trainer.global_step
        if torch.is_grad_enabled():  # not the monitor's no_grad re-evaluation (whose logging is muted)
            self.steps.append((self.trainer.optimizers[0].param_groups[0]["lr"], loss.item()))
            if t % 3 == 1:
                self.aux[t] = 10 * loss.item() + t
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=1)
        if t % 3 == 1:
            self.log("aux", 10 * loss + t, on_step=True, on_epoch=False, batch_size=1)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _batch_means(xs: list[float], b: int, confidence: float) -> tuple[float, float, float]:
    """Batch means (Ȳ ± t_{b−1,(1+c)/2}·s/√b over b batches of the last m·b samples, m = n // b), with scipy's t."""
    from scipy.stats import t as student_t

    m = len(xs) // b
    if m == 0:
        return float(np.mean(xs)), math.nan, math.nan
    means = np.array(xs[len(xs) - m * b :]).reshape(b, m).mean(1)
    half = student_t.ppf((1 + confidence) / 2, b - 1) * means.std(ddof=1) / math.sqrt(b)
    return float(means.mean()), float(means.mean() - half), float(means.mean() + half)


@pytest.mark.parametrize("reset", [True, False])
def test_time_average_monitor_logs_running_means_of_the_recorded_values(reset):
    """time_avg/φ = (1/k) Σ φ over the steps since the current lr phase began (eq. (6.4); since step 0 with
    reset_on_lr_change=False), window_avg/φ over the last 3 steps, a held metric counted every step, and the
    gain L_B(θ_t) − L_B(θ_{t+1}) every 2nd step (recomputed here from the recorded weights) with its Cesàro mean
    and batch-means interval (window 5, 2 batches, 80%), logged every 2nd batch (log_every_n_steps=2)."""
    from lightning_opt.callbacks.time_average import TimeAverageMonitor

    n, window, conf = 14, 3, 0.8
    cap, model, trace = CaptureLogger(), PhasedNet(batch_size=8, lr=0.5), Trace()
    mon = TimeAverageMonitor(metrics=["train/loss", "aux"], window=window, reset_on_lr_change=reset, gain_every=2,
                             gain_window=5, gain_batches=2, confidence=conf)
    _fit(model, [trace, mon], n, logger=cap, log_every_n_steps=2)
    lrs, losses = (list(v) for v in zip(*model.steps, strict=True))
    assert len(losses) == n and sorted(set(lrs)) == [0.125, 0.25, 0.5]
    held, last = [], math.nan  # the value of aux in callback_metrics after each step (NaN before batch 1)
    for t in range(n):
        last = model.aux.get(t, last)
        held.append(last)
    got: dict[int, dict[str, float]] = {}  # what reached the logger, by Lightning's step (the batch index)
    for t, met in cap.calls:
        for name, value in met.items():
            if name.startswith(("time_avg/", "window_avg/")):
                assert name not in got.get(t, {}), (t, name)  # one value per key and step
                got.setdefault(t, {})[name] = value
    assert sorted(got) == [t for t in range(n) if (t + 1) % 2 == 0]
    gains: list[tuple[int, float]] = []
    for t in range(n):
        start = 0
        if reset:  # the phase: the last run of steps taken at the current lr
            start = max(s for s in range(t + 1) if s == 0 or lrs[s - 1] != lrs[t])
        if (t + 1) % 2 == 0:
            f = _flat_loss(model, trace.batches[t])
            gains.append((t, losses[t] - f(trace.after[t].double()).item()))
        if t not in got:
            continue
        want, unpinned = {}, set()
        for name, series in (("train/loss", losses), ("aux", held)):
            phase = [v for v in series[start : t + 1] if math.isfinite(v)]
            recent = [v for v in series[max(0, t - window + 1) : t + 1] if math.isfinite(v)]
            if phase:
                want[f"time_avg/{name}"] = math.fsum(phase) / len(phase)
            if start > t - window + 1 > 0:
                # the window reaches back before the lr change: documented "the last `window` optimizer steps",
                # but the monitor restarts it with the phase (_reset_phase) — not pinned until that is settled
                unpinned.add(f"window_avg/{name}")
            elif recent:
                want[f"window_avg/{name}"] = math.fsum(recent) / len(recent)
        phase_gains = [g for s, g in gains if s >= start]
        if phase_gains:
            want["time_avg/gain"] = math.fsum(phase_gains) / len(phase_gains)
            mean, lo, hi = _batch_means(phase_gains[-5:], 2, conf)
            want["window_avg/gain"] = mean
            if math.isfinite(lo):
                want |= {"time_avg/gain_lo": lo, "time_avg/gain_hi": hi}
        assert set(got[t]) - unpinned == set(want), t
        for key, value in want.items():
            assert got[t][key] == pytest.approx(value, rel=1e-9, abs=1e-12), (t, key)
    assert mon.time_averages()["train/loss"] == pytest.approx(want["time_avg/train/loss"], rel=1e-12)


# ------------------------------------------------------------------------------------------ probes and torchmetrics


class MetricNet(Net):
    """Net that updates and logs a torchmetrics accuracy in ``training_step``, as ``ImageClassifier.train_acc``."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.train_acc = MulticlassAccuracy(num_classes=CLASSES, average="micro")

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        x, y = batch
        self.train_acc(self.net(x).detach(), y)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=True)
        return loss


class MetricTrace(pl.Callback):
    """The accuracy's accumulators after every training batch (put after the monitor in ``callbacks``)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, list[torch.Tensor]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        acc = pl_module.train_acc
        self.rows.append((acc._update_count, [v.clone() for v in acc.metric_state.values()]))


@pytest.mark.parametrize("make", [
    lambda: GradientNoiseMonitor(every_n_steps=2, num_batches=2, bootstrap=0, histogram=False),
    lambda: lightning_opt.callbacks.SharpnessMonitor(every_n_steps=2, max_iter=4),
    lambda: lightning_opt.callbacks.TimeAverageMonitor(gain_every=1),
], ids=["GradientNoiseMonitor", "SharpnessMonitor", "TimeAverageMonitor"])
def test_probes_leave_torchmetrics_state_alone(make):
    """Every monitor that runs ``training_step`` as a probe leaves a torchmetrics metric that ``training_step``
    updates as it was: its accumulators after every batch, the logged ``train/acc`` (per step and for the epoch)
    and the weights equal those of a run without the monitor."""

    def run(callbacks):
        cap, model, trace = CaptureLogger(), MetricNet(batch_size=8, n=48), MetricTrace()
        _fit(model, [*callbacks, trace], 6, logger=cap, log_every_n_steps=1)
        return model, trace.rows, [(k, v) for _, m in cap.calls for k, v in m.items() if k.startswith("train/acc")]

    ref, ref_rows, ref_logged = run([])
    got, rows, logged = run([make()])
    assert len(got.calls) > len(ref.calls)  # the monitor did run training_step as a probe
    assert [n for n, _ in rows] == [n for n, _ in ref_rows] == list(range(1, 7))
    for (_, mine), (_, want) in zip(rows, ref_rows, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(mine, want, strict=True))
    assert logged == ref_logged and any(k == "train/acc_epoch" for k, _ in logged)
    assert all(torch.equal(a, b) for a, b in zip(got.parameters(), ref.parameters(), strict=True))
