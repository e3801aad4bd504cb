"""Each optimizer's update against the thesis formula written out by hand (float64, several steps)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_opt.optim.acclip import ACClip
from lightning_opt.optim.clipped_sgd import ClippedSGD
from lightning_opt.optim.ingd import StochasticINGD
from lightning_opt.optim.normalized_sgd import NormalizedSGD

SHAPES = [(3, 4), (5,), ()]
STEPS = 6
TOL = dict(rtol=1e-12, atol=1e-12)


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]


def grad_sequence(seed: int = 1, scale: float = 3.0) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        [scale * torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(STEPS)
    ]


def gnorm(gs: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float((g * g).sum()) for g in gs))


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(
    "momentum,nesterov,wd,maximize",
    [(0.0, False, 0.0, False), (0.0, False, 0.1, False), (0.9, False, 0.05, False), (0.8, True, 0.05, True)],
)
@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_gclip_formula(foreach, momentum, nesterov, wd, maximize, max_norm):
    params = make_params()
    x = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(t) for t in x]
    lr = 0.1
    opt = ClippedSGD(params, lr=lr, max_norm=max_norm, momentum=momentum, nesterov=nesterov, weight_decay=wd,
                     maximize=maximize, foreach=foreach)
    for gs in grad_sequence():
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        g_eff = [-g for g in gs] if maximize else gs
        n = gnorm(g_eff)
        s = min(1.0, max_norm / n)  # thesis eq. (3.5) / GClip
        for i in range(len(x)):
            d = s * g_eff[i] + wd * x[i]
            bufs[i] = momentum * bufs[i] + d
            step = d + momentum * bufs[i] if nesterov else (bufs[i] if momentum else d)
            x[i] = x[i] - lr * step
        for p, xi in zip(params, x):
            torch.testing.assert_close(p.detach(), xi, **TOL)
        assert float(opt.last_stats["grad_norm"]) == pytest.approx(n, rel=1e-12)
        assert float(opt.last_stats["clip_scale"]) == pytest.approx(s, rel=1e-6)
        assert float(opt.last_stats["clip_fraction"]) == (1.0 if s < 1 else 0.0)
        assert float(opt.last_stats["post_clip_norm"]) == pytest.approx(min(n, max_norm), rel=1e-6)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.01)])
def test_cclip_formula(foreach, momentum, wd):
    params = make_params()
    x = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(t) for t in x]
    lr, tau = 0.05, 2.0
    opt = ClippedSGD(params, lr=lr, max_norm=tau, momentum=momentum, weight_decay=wd, scope="coordinate",
                     foreach=foreach)
    for gs in grad_sequence():
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        clipped = 0
        post_sq = 0.0
        for i, g in enumerate(gs):
            ghat = torch.minimum(tau / g.abs(), torch.ones_like(g)) * g  # thesis (CClip)
            clipped += int((g.abs() > tau).sum())
            post_sq += float((ghat * ghat).sum())
            d = ghat + wd * x[i]
            bufs[i] = momentum * bufs[i] + d
            x[i] = x[i] - lr * (bufs[i] if momentum else d)
        for p, xi in zip(params, x):
            torch.testing.assert_close(p.detach(), xi, **TOL)
        total = sum(g.numel() for g in gs)
        assert float(opt.last_stats["clip_fraction"]) == pytest.approx(clipped / total, rel=1e-6)
        assert float(opt.last_stats["post_clip_norm"]) == pytest.approx(math.sqrt(post_sq), rel=1e-6)


def test_gclip_equals_sgd_plus_clip_grad_norm():
    """GClip with momentum / Nesterov / weight decay == clip_grad_norm_ + torch.optim.SGD (up to its 1e-6)."""
    a, b = make_params(), make_params()
    opt_a = ClippedSGD(a, lr=0.1, max_norm=1.0, momentum=0.9, nesterov=True, weight_decay=0.01)
    opt_b = torch.optim.SGD(b, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    for gs in grad_sequence():
        for pa, pb, g in zip(a, b, gs):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        torch.nn.utils.clip_grad_norm_(b, 1.0)
        opt_b.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("momentum,wd,beta", [(0.0, 0.0, 1.0), (0.9, 0.02, 0.5), (0.0, 0.0, 0.0)])
def test_normalized_sgd_formula(foreach, momentum, wd, beta):
    params = make_params()
    x = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(t) for t in x]
    lr = 0.2
    opt = NormalizedSGD(params, lr=lr, beta=beta, momentum=momentum, weight_decay=wd, foreach=foreach)
    for gs in grad_sequence():
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        n = gnorm(gs)
        for i in range(len(x)):
            d = gs[i] / (n + beta) + wd * x[i]  # thesis eq. (3.6), eta_n = lr
            bufs[i] = momentum * bufs[i] + d
            x[i] = x[i] - lr * (bufs[i] if momentum else d)
        for p, xi in zip(params, x):
            torch.testing.assert_close(p.detach(), xi, **TOL)
        assert float(opt.last_stats["clip_scale"]) == pytest.approx(1.0 / (n + beta), rel=1e-6)
        assert float(opt.last_stats["post_clip_norm"]) == pytest.approx(n / (n + beta), rel=1e-6)


def test_normalized_sgd_zero_gradient_beta_zero_is_a_no_op():
    p = torch.nn.Parameter(torch.ones(3))
    opt = NormalizedSGD([p], lr=1.0, beta=0.0)
    p.grad = torch.zeros(3)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3))


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("wd,maximize", [(0.0, False), (0.01, True)])
def test_acclip_formula(foreach, alpha, wd, maximize):
    params = make_params()
    x = [p.detach().clone() for p in params]
    m = [torch.zeros_like(t) for t in x]
    tau_a = [torch.zeros_like(t) for t in x]
    lr, b1, b2, eps = 0.01, 0.9, 0.99, 1e-5
    opt = ACClip(params, lr=lr, betas=(b1, b2), alpha=alpha, eps=eps, weight_decay=wd, maximize=maximize,
                 foreach=foreach)
    for gs in grad_sequence():
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        clipped = total = 0
        for i, g in enumerate(gs):  # thesis §4.5 Alg. 1
            g = -g if maximize else g
            m[i] = b1 * m[i] + (1 - b1) * g
            tau_a[i] = b2 * tau_a[i] + (1 - b2) * g.abs() ** alpha
            tau = tau_a[i] ** (1 / alpha)
            factor = torch.minimum(tau / (m[i].abs() + eps), torch.ones_like(tau))
            clipped += int((factor < 1).sum())
            total += g.numel()
            x[i] = (1 - lr * wd) * x[i] - lr * factor * m[i]  # decoupled weight decay
        for p, xi in zip(params, x):
            torch.testing.assert_close(p.detach(), xi, **TOL)
        assert float(opt.last_stats["clip_fraction"]) == pytest.approx(clipped / total, rel=1e-6)


def nonsmooth_grad(y: torch.Tensor) -> torch.Tensor:
    """Gradient of sum(|y| + 0.25 y^2 + 0.3 y) (a generalized gradient at kinks)."""
    return torch.sign(y) + 0.5 * y + 0.3


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("lr,beta,p_,q,wd", [(1.0, 0.9, 1.0, 10.0, 5e-4), (0.5, 0.5, 2.0, 0.0, 0.0)])
def test_ingd_formula(foreach, lr, beta, p_, q, wd):
    params = make_params()
    seed = 1234
    opt = StochasticINGD(params, lr=lr, beta=beta, p=p_, q=q, weight_decay=wd, seed=seed, foreach=foreach)
    gen = torch.Generator().manual_seed(seed)
    x = [t.detach().clone() for t in params]  # x_1 = y_1
    y = [t.clone() for t in x]
    m: list[torch.Tensor] | None = None
    for _ in range(STEPS):
        for prm, yi in zip(params, y):
            torch.testing.assert_close(prm.detach(), yi, **TOL)
            prm.grad = nonsmooth_grad(prm.detach())
        opt.step()
        # thesis ch. 5 Alg. 3
        g = [nonsmooth_grad(yi) + wd * yi for yi in y]
        m = g if m is None else [beta * mi + (1 - beta) * gi for mi, gi in zip(m, g)]
        eta = lr / (p_ * gnorm(m) + q)
        x_next = [xi - eta * mi for xi, mi in zip(x, m)]
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        y = [xi + u * (xn - xi) for xi, xn in zip(x, x_next)]
        x = x_next
        for prm, xi, yi in zip(params, x, y):
            torch.testing.assert_close(opt.state[prm]["x"], xi, **TOL)
            torch.testing.assert_close(prm.detach(), yi, **TOL)
        assert float(opt.last_stats["eta"]) == pytest.approx(eta, rel=1e-6)
        assert float(opt.last_stats["u"]) == pytest.approx(u, rel=1e-6)
