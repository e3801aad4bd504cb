"""Cesàro / windowed averages and batch-means intervals (lightning_opt.stats.averages) against numpy, plus the
thesis Fig. 6-5 setting (gradient descent on f = 100 sin θ1 sin θ2) measured with them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_opt.stats.averages import (
    BatchMeansWindow,
    CesaroAverage,
    WindowedAverage,
    batch_means_ci,
    student_t_abs_cdf,
    t_critical,
)


def test_cesaro_matches_numpy_and_skips_nonfinite():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3))
    x[7, 1] = np.nan
    x[20, 2] = np.inf
    avg = CesaroAverage(3)
    for k in range(50):
        avg.update(torch.from_numpy(x[k]))
        ref = np.nanmean(np.where(np.isfinite(x[: k + 1]), x[: k + 1], np.nan), axis=0)
        np.testing.assert_allclose(avg.mean().numpy(), ref, rtol=1e-12)
    assert avg.count.tolist() == [50, 49, 49]
    assert avg.skipped.tolist() == [0, 1, 1]
    avg.reset()
    assert torch.isnan(avg.mean()).all()


def test_windowed_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=40)
    x[12] = np.nan
    win = WindowedAverage(7)
    for k in range(40):
        win.update(float(x[k]))
        tail = x[max(0, k - 6): k + 1]
        np.testing.assert_allclose(win.mean().item(), np.nanmean(tail), rtol=1e-12)
    assert win.skipped.item() == 1


def test_scalar_and_state_dict_roundtrip():
    a, w = CesaroAverage(), WindowedAverage(5)
    for v in (1.0, 2.0, 4.0):
        a.update(v)
        w.update(v)
    a2, w2 = CesaroAverage(), WindowedAverage(5)
    a2.load_state_dict(a.state_dict())
    w2.load_state_dict(w.state_dict())
    for v in (8.0, 16.0, 32.0, 64.0):
        for acc in (a, a2, w, w2):
            acc.update(v)
    assert a.mean().item() == a2.mean().item() == pytest.approx(127 / 7)
    assert w.mean().item() == w2.mean().item() == pytest.approx((4 + 8 + 16 + 32 + 64) / 5)
    with pytest.raises(ValueError, match="shape"):
        CesaroAverage(2).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="window"):
        WindowedAverage(4).load_state_dict(w.state_dict())
    with pytest.raises(ValueError, match="shape"):
        a.update(torch.zeros(2))


def test_student_t():
    # table values of the two-sided critical value t_{df}(confidence)
    assert t_critical(0.95, 1) == pytest.approx(12.7062047, rel=1e-7)
    assert t_critical(0.95, 9) == pytest.approx(2.2621572, rel=1e-7)
    assert t_critical(0.95, 30) == pytest.approx(2.0422725, rel=1e-7)
    assert t_critical(0.99, 2) == pytest.approx(9.9248432, rel=1e-7)
    assert t_critical(0.95, 10**6) == pytest.approx(1.9599640, rel=1e-7)
    for t in (0.1, 1.0, 3.0):  # df = 2 has the closed form t / sqrt(2 + t^2)
        assert student_t_abs_cdf(t, 2) == pytest.approx(t / math.sqrt(2 + t * t), rel=1e-13)
        assert student_t_abs_cdf(t, 1) == pytest.approx(2 / math.pi * math.atan(t), rel=1e-13)


def _numpy_batch_means(x: np.ndarray, b: int, conf: float) -> tuple[float, float, float]:
    m = len(x) // b
    means = x[len(x) - m * b:].reshape(b, m).mean(axis=1)
    half = t_critical(conf, b - 1) * means.std(ddof=1) / np.sqrt(b)
    return means.mean(), means.mean() - half, means.mean() + half


def test_batch_means_matches_numpy_and_window():
    x = np.random.default_rng(2).normal(size=103)
    got = batch_means_ci(x.tolist(), 10, 0.9)
    np.testing.assert_allclose(got, _numpy_batch_means(x, 10, 0.9), rtol=1e-12)
    np.testing.assert_allclose(batch_means_ci(torch.from_numpy(x), 10, 0.9), got, rtol=1e-12)
    bw = BatchMeansWindow(50, 5)
    for v in x:
        bw.update(float(v))
    bw.update(math.nan)
    assert bw.full and bw.skipped == 1
    np.testing.assert_allclose(bw.ci(0.95), _numpy_batch_means(x[-50:], 5, 0.95), rtol=1e-12)
    assert math.isnan(batch_means_ci([1.0, 2.0], 4)[1])  # too few samples for 4 batches


def test_batch_means_coverage_on_correlated_sequence():
    """AR(1) with φ = 0.8 (correlation time ~ 9 steps): batch means cover the true mean ≈ 95 % of the time,
    whereas the i.i.d. interval (batches of one sample) is far too narrow."""
    rng = np.random.default_rng(3)
    reps, n, phi = 300, 1000, 0.8
    x = np.empty((reps, n))
    x[:, 0] = rng.normal(size=reps) / np.sqrt(1 - phi**2)
    eps = rng.normal(size=(reps, n))
    for t in range(1, n):
        x[:, t] = phi * x[:, t - 1] + eps[:, t]
    bm = iid = 0
    for r in range(reps):
        _, lo, hi = batch_means_ci(x[r], 20, 0.95)
        bm += lo <= 0.0 <= hi
        _, lo, hi = batch_means_ci(x[r], n, 0.95)
        iid += lo <= 0.0 <= hi
    assert 0.88 <= bm / reps <= 0.99
    assert iid / reps < 0.75


def test_batch_means_telescoping_cycle_contains_zero():
    """On a deterministic cycle the gains L(θ_t) − L(θ_{t+1}) telescope: the interval contains 0."""
    cycle = np.array([3.0, -1.0, 2.0, -4.0, 0.5])
    loss = np.tile(cycle, 40)
    gains = loss[:-1] - loss[1:]
    mean, lo, hi = batch_means_ci(gains, 10, 0.95)
    assert lo < 0.0 < hi and abs(mean) < 0.1 * (hi - lo)
    # a steady descent does not
    _, lo, _ = batch_means_ci(np.full(100, 0.3) + 0.01 * np.sin(np.arange(100)), 10, 0.95)
    assert lo > 0.0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: CesaroAverage(-1), "shape"),
        (lambda: CesaroAverage(2.0), "invalid shape=2.0"),
        (lambda: CesaroAverage(dtype=torch.int64), "dtype"),
        (lambda: WindowedAverage(0), "window"),
        (lambda: batch_means_ci([1.0] * 10, 1), "n_batches"),
        (lambda: batch_means_ci([1.0] * 10, 2, confidence=1.0), "confidence"),
        (lambda: t_critical(0.0, 3), "confidence"),
        (lambda: t_critical(0.9, 0), "df"),
        (lambda: BatchMeansWindow(3, 4), "window"),
        (lambda: BatchMeansWindow(10, 1), "n_batches"),
    ],
)
def test_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------- thesis Fig. 6-5


def _gd_sin(eta: float, steps: int = 2000, theta0=(1.0, -0.5)):
    """Gradient descent on f(θ1, θ2) = 100 sin θ1 sin θ2 (L_f = 100, so η < 2/L_f = 0.02 converges)."""
    theta = torch.tensor(theta0, dtype=torch.float64)
    loss_avg, grad_avg, grad_win = CesaroAverage(), CesaroAverage(), WindowedAverage(500)
    losses, grads, thetas, loss_avgs, grad_avgs = [], [], [], [], []
    for _ in range(steps):
        s, c = torch.sin(theta), torch.cos(theta)
        loss = 100 * s[0] * s[1]
        grad = 100 * torch.stack([c[0] * s[1], s[0] * c[1]])
        gnorm = grad.norm()
        loss_avg.update(loss)
        grad_avg.update(gnorm)
        grad_win.update(gnorm)
        losses.append(loss.item())
        grads.append(gnorm.item())
        thetas.append(theta.clone())
        loss_avgs.append(loss_avg.mean().item())
        grad_avgs.append(grad_avg.mean().item())
        theta = theta - eta * grad
    return (np.array(losses), np.array(grads), torch.stack(thetas), np.array(loss_avgs), np.array(grad_avgs),
            grad_win.mean().item())


def test_fig_6_5_small_step_converges_to_a_stationary_point():
    losses, grads, thetas, loss_avgs, grad_avgs, _ = _gd_sin(0.01)
    assert (thetas[-1] - thetas[-2]).norm() < 1e-10  # iterates converge
    assert grads[-1] < 1e-8  # to a stationary point
    assert losses[-1] == pytest.approx(-100.0, abs=1e-8)
    np.testing.assert_allclose(np.cumsum(losses) / np.arange(1, 2001), loss_avgs, rtol=1e-12)


def test_fig_6_5_large_step_cycles_but_time_averages_converge():
    losses, grads, thetas, loss_avgs, grad_avgs, grad_win_last500 = _gd_sin(0.04)
    last = slice(1500, 2000)
    # pointwise: no convergence — the last 500 iterates keep moving, loss and gradient norm oscillate
    steps = (thetas[1501:2000] - thetas[1500:1999]).norm(dim=1)
    assert steps.min() > 0.1
    assert grads[last].std() > 5.0 and grads[last].max() - grads[last].min() > 30.0
    assert losses[last].max() - losses[last].min() > 50.0
    # the gradient norm stays away from 0: the limit of its average is not a stationary point
    assert grad_avgs[-1] > 30.0
    # time averages converge: < 1 % change over the last 500 of 2,000 steps (issue 9), and the loss average
    # moves by far less than the loss oscillates
    assert abs(grad_avgs[-1] - grad_avgs[1499]) / grad_avgs[-1] < 0.01
    assert abs(loss_avgs[-1] - loss_avgs[1499]) < 0.02 * (losses[last].max() - losses[last].min())
    # the windowed average over the last 500 steps agrees with the Cesàro average (same invariant measure)
    assert grad_win_last500 == pytest.approx(grads[last].mean(), rel=1e-12)
    assert abs(grad_win_last500 - grad_avgs[-1]) / grad_avgs[-1] < 0.05
    # ... at a higher loss than the small step size reaches (below 2/L: the descent lemma)
    assert loss_avgs[-1] > -50.0
