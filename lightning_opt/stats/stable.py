"""Symmetric α-stable random numbers in pure torch (Chambers–Mallows–Stuck).

Reference: J. M. Chambers, C. L. Mallows, B. W. Stuck, "A method for simulating stable random variables",
JASA 71 (1976); the symmetric (β = 0) case as written in Weron, "On the Chambers–Mallows–Stuck method for
simulating skewed stable random variables", Stat. Probab. Lett. 28 (1996), eq. (3.1)::

    V ~ Uniform(-π/2, π/2),  W ~ Exp(1) independent,
    X = sin(αV) / cos(V)^(1/α) · ( cos((1 - α)V) / W )^((1 - α)/α)          (α ≠ 1)
    X = tan(V)                                                               (α = 1, Cauchy)

X has characteristic function E exp(itX) = exp(-|t|^α) (scale 1, so α = 2 gives N(0, 2)). These are the
heavy-tailed laws Şimşekli et al. 2019 model gradient noise with, and the ones thesis ch. 4 Fig. 4-1(g)
compares noise histograms against. Used by the tests of :mod:`lightning_opt.stats.tail_index`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_opt._validation import invalid

__all__ = ["symmetric_stable"]


def symmetric_stable(
    alpha: float,
    size: int | tuple[int, ...] | torch.Size,
    *,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw i.i.d. symmetric α-stable samples S_α(scale, β=0, μ=0) by Chambers–Mallows–Stuck.

    Args:
        alpha: stability index in (0, 2]; 2 is Gaussian with variance ``2 * scale**2``, 1 is Cauchy.
        size: output shape.
        scale: scale parameter σ > 0 (characteristic function exp(-|σt|^α)).
        generator: optional ``torch.Generator`` for reproducible draws (must live on ``device``).
        dtype: floating dtype of the computation and the result (float64 by default: the CMS formula
            produces very large values for small α, where float32 loses the tail).
        device: where to draw.
    """
    alpha = float(alpha)
    if not (0.0 < alpha <= 2.0) or math.isnan(alpha):
        raise invalid("alpha", alpha, "a number with alpha in (0, 2]", owner="symmetric_stable")
    if not (scale > 0.0 and math.isfinite(scale)):
        raise invalid("scale", scale, "a finite number with scale > 0", owner="symmetric_stable")
    if not dtype.is_floating_point:
        raise invalid("dtype", dtype, "a floating-point torch dtype", owner="symmetric_stable")
    shape = (size,) if isinstance(size, int) else tuple(size)
    u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
    v = math.pi * (u - 0.5)
    if alpha == 1.0:
        return scale * torch.tan(v)
    w = torch.empty(shape, dtype=dtype, device=device).exponential_(1.0, generator=generator)
    x = torch.sin(alpha * v) / torch.cos(v).pow(1.0 / alpha) * (torch.cos((1.0 - alpha) * v) / w).pow(
        (1.0 - alpha) / alpha
    )
    return scale * x
