"""Local smoothness along the trajectory and the (L0, L1)-smoothness fit (pure torch / Python).

Seeds:

* (L0, L1)-smoothness, thesis Def. 3.2.1, eq. (3.2): ‖∇²f(x)‖ ≤ L0 + L1‖∇f(x)‖. Fig. 3-1 plots a local
  smoothness estimate against the gradient norm along training; the estimate there is the finite difference of
  gradients along the last update, ‖∇f(x_{t+1}) − ∇f(x_t)‖ / ‖x_{t+1} − x_t‖ (:func:`local_smoothness`). The
  curvature along the update, dᵀ∇²f d / ‖d‖² (:func:`directional_curvature`), costs one Hessian-vector
  product.
* Thm 3.4.1: clipped GD (eq. (3.5), h = min{η_c, γη_c/‖∇f‖}) with η_c = 1/(10 L0) and
  γ = min{1/η_c, 1/(10 L1 η_c)} (:func:`clipping_advice`).

:class:`L0L1Fit` is a running least-squares fit of ``L̂ ≈ L0 + L1 ‖∇f‖`` with optional exponential forgetting
and non-negative coefficients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_opt._validation import check_float

__all__ = ["L0L1Fit", "clipping_advice", "directional_curvature", "local_smoothness"]


def local_smoothness(grad_new: Tensor, grad_old: Tensor, step: Tensor) -> float:
    """‖∇f(x_{t+1}) − ∇f(x_t)‖ / ‖x_{t+1} − x_t‖ (thesis Fig. 3-1); ``nan`` when the step is zero."""
    d = float(torch.linalg.vector_norm(step.double()))
    if not d > 0:
        return math.nan
    return float(torch.linalg.vector_norm(grad_new - grad_old)) / d


def directional_curvature(hvp: Callable[[Tensor], Tensor], direction: Tensor) -> float:
    """Rayleigh quotient dᵀ H d / ‖d‖² (one product); ``nan`` for a zero direction."""
    nrm = float(torch.linalg.vector_norm(direction))
    if not nrm > 0:
        return math.nan
    u = direction / nrm
    return float(torch.dot(u, hvp(u).to(u.dtype)))


def clipping_advice(l0: float, l1: float) -> tuple[float, float]:
    """Thesis Thm 3.4.1: step size η_c = 1/(10 L0) and clipping threshold γ = min{1/η_c, 1/(10 L1 η_c)}
    (= min{10 L0, L0/L1}) for clipped GD h = min{η_c, γ η_c/‖∇f‖}. ``(nan, nan)`` if L0 ≤ 0 or non-finite."""
    if not (math.isfinite(l0) and l0 > 0 and math.isfinite(l1) and l1 >= 0):
        return math.nan, math.nan
    eta_c = 1.0 / (10.0 * l0)
    gamma = 1.0 / eta_c if l1 == 0 else min(1.0 / eta_c, 1.0 / (10.0 * l1 * eta_c))
    return eta_c, gamma


class L0L1Fit:
    """Running least squares ``L̂ ≈ L0 + L1·g`` over points ``(g, L̂) = (‖∇f‖, local smoothness)``.

    Args:
        decay: forgetting factor in (0, 1]; each update multiplies the accumulated sums by ``decay`` first
            (1 = plain least squares over all points).

    The fit is constrained to L0, L1 ≥ 0 (the quantities of Def. 3.2.1): if the unconstrained solution has a
    negative coefficient, the best fit with that coefficient at zero is returned. Non-finite points are
    ignored.
    """

    def __init__(self, decay: float = 1.0) -> None:
        check_float("decay", decay, 0.0, 1.0, low_open=True)
        self.decay = float(decay)
        self.n = 0
        self.w = 0.0
        self.sx = 0.0
        self.sy = 0.0
        self.sxx = 0.0
        self.sxy = 0.0

    def update(self, grad_norm: float, smoothness: float) -> None:
        x, y = float(grad_norm), float(smoothness)
        if not (math.isfinite(x) and math.isfinite(y)):
            return
        d = self.decay
        self.w = d * self.w + 1.0
        self.sx = d * self.sx + x
        self.sy = d * self.sy + y
        self.sxx = d * self.sxx + x * x
        self.sxy = d * self.sxy + x * y
        self.n += 1

    def fit(self) -> tuple[float, float]:
        """``(L0, L1)``; ``(nan, nan)`` before the first point, ``(mean, 0)`` while the g's have no spread."""
        if self.n == 0 or self.w <= 0:
            return math.nan, math.nan
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        cov = self.sxy / self.w - mx * my
        if self.n < 2 or var <= 1e-12 * max(mx * mx, 1e-300):
            return max(my, 0.0), 0.0
        l1 = cov / var
        l0 = my - l1 * mx
        if l1 < 0:
            return max(my, 0.0), 0.0
        if l0 < 0:  # best line through the origin
            return 0.0, max(self.sxy / self.sxx, 0.0) if self.sxx > 0 else 0.0
        return l0, l1

    def advice(self) -> tuple[float, float]:
        """:func:`clipping_advice` of the current fit."""
        return clipping_advice(*self.fit())

    def state_dict(self) -> dict[str, float]:
        return {"decay": self.decay, "n": self.n, "w": self.w, "sx": self.sx, "sy": self.sy, "sxx": self.sxx,
                "sxy": self.sxy}

    def load_state_dict(self, state: dict[str, float]) -> None:
        for k in ("w", "sx", "sy", "sxx", "sxy"):
            setattr(self, k, float(state[k]))
        self.n = int(state["n"])
        self.decay = float(state.get("decay", self.decay))
