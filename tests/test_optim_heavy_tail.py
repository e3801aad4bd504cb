"""Thesis Remark 4.4.1: under symmetric alpha-stable gradient noise (alpha = 1.5, infinite variance) SGD's
error on f(x) = ||x||^2 / 2 does not settle, while GClip (thesis §4.4.1) converges.
"""

from __future__ import annotations

import math
import statistics

import torch

from lightning_opt.optim.clipped_sgd import ClippedSGD

D, STEPS, SEEDS, ALPHA = 10, 500, 16, 1.5
X0 = 5.0  # initial error ||x_0|| = 5 sqrt(10)


def symmetric_stable(shape: tuple[int, ...], alpha: float, gen: torch.Generator) -> torch.Tensor:
    """Chambers-Mallows-Stuck sampler for a standard symmetric alpha-stable law (beta = 0, alpha != 1)."""
    v = (torch.rand(shape, generator=gen, dtype=torch.float64) - 0.5) * math.pi  # U(-pi/2, pi/2)
    w = -torch.log1p(-torch.rand(shape, generator=gen, dtype=torch.float64))  # Exp(1)
    return (
        torch.sin(alpha * v)
        / torch.cos(v) ** (1.0 / alpha)
        * (torch.cos((1.0 - alpha) * v) / w) ** ((1.0 - alpha) / alpha)
    )


def final_error(make_opt, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    noise = symmetric_stable((STEPS, D), ALPHA, gen)
    x = torch.nn.Parameter(torch.full((D,), X0, dtype=torch.float64))
    opt = make_opt([x])
    for t in range(STEPS):
        x.grad = x.detach() + noise[t]  # unbiased stochastic gradient of ||x||^2 / 2
        opt.step()
    return float(x.detach().norm())


def test_sampler_is_heavy_tailed_and_symmetric():
    z = symmetric_stable((200_000,), ALPHA, torch.Generator().manual_seed(0))
    assert abs(float(z.median())) < 0.02
    # P(|Z| > t) ~ c t^-alpha: the tail ratio over a factor 4 in t is about 4^alpha = 8 (Gaussian: huge)
    p10, p40 = float((z.abs() > 10).double().mean()), float((z.abs() > 40).double().mean())
    assert 5.0 < p10 / p40 < 12.0


def test_gclip_converges_where_sgd_does_not():
    lr = 0.1
    sgd = [final_error(lambda p: torch.optim.SGD(p, lr=lr), s) for s in range(SEEDS)]
    gclip = [final_error(lambda p: ClippedSGD(p, lr=lr, max_norm=1.0), s) for s in range(SEEDS)]
    x0 = X0 * math.sqrt(D)
    # GClip converges: the median final error is a small fraction of the initial one, uniformly over seeds
    assert statistics.median(gclip) < 0.1 * x0
    assert max(gclip) < 0.1 * x0
    # SGD with the same step size is dominated by single huge noise draws: its median error is several times
    # GClip's and its worst seed is far off.
    assert statistics.median(sgd) > 3.0 * statistics.median(gclip)
    assert max(sgd) > 5.0 * max(gclip)
