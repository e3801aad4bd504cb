"""ACClip: adaptive coordinate-wise clipping with momentum."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_opt._validation import check_bool, check_float
from lightning_opt.optim._base import ClipOptimizerBase, GroupGrads, Stats, zeros_state
from lightning_opt.optim._tensor_lists import by_device_and_dtype, scratch_or_new, state_precision

__all__ = ["ACClip", "acclip_adaptive"]


class ACClip(ClipOptimizerBase):
    r"""Adaptive Coordinate-wise Clipping, thesis §4.5 Alg. 1 (ACClip). Per coordinate, with :math:`g_k` the
    stochastic gradient:

    .. math::
        m_k &= \beta_1 m_{k-1} + (1-\beta_1)\, g_k \\
        \tau_k^\alpha &= \beta_2 \tau_{k-1}^\alpha + (1-\beta_2)\, |g_k|^\alpha \\
        \hat g_k &= \min\Big\{\frac{\tau_k}{|m_k| + \epsilon}, 1\Big\}\, m_k \\
        x_k &= x_{k-1} - \eta_k \hat g_k

    i.e. the momentum is clipped coordinate-wise at a threshold that tracks the running
    :math:`\alpha`-th moment of the gradient (line 4-5 of Alg. 1); no bias correction, as in the algorithm.
    Defaults are the thesis' BERT settings (§4.6.2): ``lr=1e-4``, ``betas=(0.9, 0.99)``, ``alpha=1``,
    ``eps=1e-5``, ``weight_decay=1e-5``.

    **Initialisation** :math:`m_0 = 0` (Alg. 1 line 1) and :math:`\tau_0^\alpha = 0`. Alg. 1 initialises only
    :math:`x` and :math:`m`; we start the moment estimate at zero like the momentum, for two reasons: (i) an
    estimate seeded with the first gradient (:math:`\tau_0^\alpha = |g_1|^\alpha`) lets a single heavy-tailed
    outlier at step 1 set the threshold -- and so switch clipping off -- for :math:`\sim 1/(1-\beta_2)` steps,
    which is exactly the failure clipping is meant to prevent; from zero, a sample enters with weight
    :math:`1-\beta_2`; (ii) it makes the first :math:`\sim 1/(1-\beta_2)` steps conservative (the threshold
    grows like :math:`(1-\beta_2^k)^{1/\alpha}` while :math:`|m_k|` grows like :math:`1-\beta_1^k`), a
    built-in warm-up in line with the warm-up used in the BERT runs.

    **Adaptive step** (``adaptive=True``), thesis §7.2.1: RMSProp read as clipping. With :math:`v_{k-1}` the
    running second moment before step :math:`k` (``alpha=2``: :math:`v_k = \beta_2 v_{k-1} + (1-\beta_2) g_k^2`,
    :math:`v_0 = 0`) and :math:`d_k = \epsilon + \sqrt{\beta_2 v_{k-1}}` per coordinate, the step size and the
    threshold become

    .. math:: \eta_k = \frac{2\eta}{d_k}, \qquad \tau_k = \frac{d_k}{\sqrt{1-\beta_2}}, \qquad
        x_k = x_{k-1} - \eta_k \min\Big\{\frac{\tau_k}{|m_k|}, 1\Big\} m_k,

    against RMSProp with step :math:`\eta` (there :math:`m_k = g_k`, i.e. ``betas[0] = 0``; we clip the momentum
    as Alg. 1 does). The thesis states :math:`\tfrac12 h_\text{clip} \le h_\text{RMSProp} \le 2 h_\text{clip}`
    for the per-coordinate step sizes; what holds (as :math:`\epsilon \to 0`) is
    :math:`h_\text{clip}/(2\sqrt2) \le h_\text{RMSProp} \le h_\text{clip}/2`, both ends reached: this step is
    2 to 2.8 times RMSProp's at the same ``lr`` (the thesis' lower bound is off by up to :math:`\sqrt2`). ``lr``
    is thus an RMSProp-sized step, and the thesis' BERT lr 1e-4 makes sense; with ``adaptive=False`` the step
    is ``lr`` itself, and 1e-4 barely moves a small model.

    **Weight decay** is decoupled (AdamW-style): :math:`x_k = (1 - \eta_k\lambda)\,x_{k-1} - \eta_k \hat g_k`.
    Coupled L2 (:math:`g_k + \lambda x`) would pass the deterministic decay term through the moment estimate
    :math:`\tau` and through the clip, so its strength would depend on the noise level and could be clipped
    away; decoupling keeps the decay rate :math:`\eta\lambda` independent of clipping, as in the AdamW-type
    optimiser of the BERT setup the thesis compares against.

    Args:
        params: parameters or param groups.
        lr: :math:`\eta \ge 0`.
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``.
        alpha: moment order :math:`\alpha \in (0, 2]`; ``None`` (default): 1, or 2 with ``adaptive=True``
            (which needs 2: §7.2.1 uses the second moment).
        eps: :math:`\epsilon > 0` (keeps the ratio finite where :math:`m = 0`).
        weight_decay: decoupled decay :math:`\lambda \ge 0`.
        adaptive: the §7.2.1 step and threshold above (optimizer-wide).
        maximize, foreach, nonfinite: as in :class:`ClippedSGD` (``nonfinite``: ``"skip"`` or ``"raise"``).

    State per parameter (float32 for half-precision parameters): ``exp_avg`` (:math:`m`) and ``tau_alpha``
    (:math:`\tau^\alpha`), plus one scratch buffer (not checkpointed) on the foreach path.

    :attr:`last_stats` (0-d tensors): ``grad_norm`` (raw gradient), ``clip_fraction`` (share of coordinates
    whose clip factor :math:`\min\{\tau/(|m|+\epsilon), 1\}` is below 1), ``skipped``.
    """

    def __init__(
        self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99), alpha: float | None = None, eps: float = 1e-5,
        weight_decay: float = 1e-5, *, adaptive: bool = False, maximize: bool = False, foreach: bool | None = None,
        nonfinite: str = "skip",
    ) -> None:
        self.adaptive = bool(check_bool("adaptive", adaptive, owner=type(self).__name__))
        alpha = (2.0 if adaptive else 1.0) if alpha is None else alpha  # §7.2.1 uses the second moment
        defaults = dict(lr=lr, betas=betas, alpha=alpha, eps=eps, weight_decay=weight_decay, maximize=maximize,
                        foreach=foreach)
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _validate_hyper(self, owner: str, group: dict[str, Any]) -> None:
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{owner}: invalid betas={betas!r}; expected a pair (beta1, beta2), each in [0, 1)")
        for i, beta in enumerate(betas):
            check_float(f"betas[{i}]", beta, 0.0, 1.0, high_open=True, owner=owner)
        check_float("alpha", group["alpha"], 0.0, 2.0, low_open=True, owner=owner)
        if self.adaptive and group["alpha"] != 2.0:
            raise ValueError(f"{owner}: invalid alpha={group['alpha']!r} with adaptive=True; expected alpha=2 or None "
                             "(the adaptive step uses the second moment)")
        check_float("eps", group["eps"], 0.0, low_open=True, owner=owner)

    def _update(self, batches: list[GroupGrads], norm: Tensor, norm_value: float) -> Stats:
        unclipped: list[Tensor] = []  # per tensor: number of coordinates with clip factor == 1
        numel = 0
        for b in batches:
            group = b.group
            exp_avgs, moments = zeros_state(self.state, b.params, "exp_avg", "tau_alpha")
            beta1, beta2 = (float(beta) for beta in group["betas"])
            hyper = dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                         weight_decay=float(group["weight_decay"]), foreach=b.foreach)
            scratch = self._scratch(b.params) if b.foreach else None
            if self.adaptive:
                counts = acclip_adaptive(b.params, b.grads, exp_avgs, moments, scratch, **hyper)
            else:
                counts = acclip(b.params, b.grads, exp_avgs, moments, scratch, alpha=float(group["alpha"]), **hyper)
            unclipped.extend(c.to(norm.device) for c in counts)
            numel += sum(g.numel() for g in b.grads)

        def entries() -> dict[str, Tensor]:
            kept = torch.stack(unclipped).sum().float() if unclipped else torch.zeros((), device=norm.device)
            return {"clip_fraction": 1.0 - kept / max(numel, 1)}

        return entries


def acclip(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], tau_alphas: list[Tensor],
           scratch: list[Tensor] | None, *, lr: float, beta1: float, beta2: float, alpha: float, eps: float,
           weight_decay: float, foreach: bool) -> list[Tensor]:
    """Thesis §4.5 Alg. 1 per coordinate (lines 3-6): m ← β₁m + (1 − β₁)g, τ^α ← β₂τ^α + (1 − β₂)|g|^α,
    x ← (1 − ηλ)x − η min{τ/(|m| + ε), 1} m. ``scratch`` (foreach path) holds |g|^α, then the clip divisor.
    Returns the number of unclipped coordinates per tensor."""
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, alpha=alpha, eps=eps, weight_decay=weight_decay)
    if foreach:
        return _acclip_foreach(params, grads, exp_avgs, tau_alphas, scratch_or_new(scratch, grads), **hyper)
    return _acclip_single(params, grads, exp_avgs, tau_alphas, **hyper)


def _acclip_single(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], tau_alphas: list[Tensor], *,
                   lr: float, beta1: float, beta2: float, alpha: float, eps: float,
                   weight_decay: float) -> list[Tensor]:
    unclipped: list[Tensor] = []
    for p, g, m, ta in zip(params, grads, exp_avgs, tau_alphas, strict=True):
        m.lerp_(g, 1.0 - beta1)
        ta.lerp_(g * g if alpha == 2.0 else g.abs().pow_(alpha), 1.0 - beta2)
        tau = ta if alpha == 1.0 else ta.sqrt() if alpha == 2.0 else ta.pow(1.0 / alpha)
        factor = (tau / (m.abs() + eps)).clamp_(max=1.0)
        unclipped.append((factor == 1.0).sum())
        with state_precision([p], foreach=False) as (x,):
            if weight_decay != 0:
                x.mul_(1.0 - lr * weight_decay)
            x.addcmul_(factor, m, value=-lr)
    return unclipped


def _acclip_foreach(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], tau_alphas: list[Tensor],
                    scratch: list[Tensor], *, lr: float, beta1: float, beta2: float, alpha: float, eps: float,
                    weight_decay: float) -> list[Tensor]:
    unclipped: list[Tensor] = []
    for ps, gs, ss, ms, tas in by_device_and_dtype(params, grads, scratch, exp_avgs, tau_alphas):
        torch._foreach_lerp_(ms, gs, 1.0 - beta1)
        torch._foreach_copy_(ss, gs)  # |g|^alpha, in the scratch buffer
        torch._foreach_abs_(ss)
        if alpha == 2.0:
            torch._foreach_mul_(ss, ss)
        elif alpha != 1.0:
            torch._foreach_pow_(ss, alpha)
        torch._foreach_lerp_(tas, ss, 1.0 - beta2)
        # r = (|m| + eps) / tau clamped below at 1: g_hat = m / r = min{tau / (|m| + eps), 1} m
        taus = tas if alpha == 1.0 else torch._foreach_sqrt(tas) if alpha == 2.0 else torch._foreach_pow(
            tas, 1.0 / alpha)
        torch._foreach_copy_(ss, ms)
        torch._foreach_abs_(ss)
        torch._foreach_add_(ss, eps)
        torch._foreach_div_(ss, taus)
        torch._foreach_clamp_min_(ss, 1.0)
        with state_precision(ps, foreach=True) as xs:
            if weight_decay != 0:
                torch._foreach_mul_(xs, 1.0 - lr * weight_decay)
            torch._foreach_addcdiv_(xs, ms, ss, value=-lr)
        # 1 / r is in [0, 1]; its floor is 1 exactly where the coordinate is not clipped
        torch._foreach_reciprocal_(ss)
        torch._foreach_floor_(ss)
        unclipped.extend(torch._foreach_norm(ss, 1))
    return unclipped


def acclip_adaptive(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], sq_avgs: list[Tensor],
                    scratch: list[Tensor] | None, *, lr: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float, foreach: bool) -> list[Tensor]:
    """Thesis §7.2.1 per coordinate: d = ε + √(β₂ v), m ← β₁m + (1 − β₁)g,
    x ← (1 − ηλ)x − (2η/d)·clamp(m, −d/√(1 − β₂), d/√(1 − β₂)), then v ← β₂v + (1 − β₂)g². ``scratch`` (foreach
    path) holds d. Returns the number of unclipped coordinates per tensor."""
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    if foreach:
        return _acclip_adaptive_foreach(params, grads, exp_avgs, sq_avgs, scratch_or_new(scratch, grads), **hyper)
    return _acclip_adaptive_single(params, grads, exp_avgs, sq_avgs, **hyper)


def _acclip_adaptive_single(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], sq_avgs: list[Tensor],
                            *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> list[Tensor]:
    unclipped: list[Tensor] = []
    for p, g, m, v in zip(params, grads, exp_avgs, sq_avgs, strict=True):
        m.lerp_(g, 1.0 - beta1)
        d = (v * beta2).sqrt_().add_(eps)  # from v before this step's gradient
        tau = d / math.sqrt(1.0 - beta2)
        unclipped.append((m.abs() <= tau).sum())
        with state_precision([p], foreach=False) as (x,):
            if weight_decay != 0:
                x.mul_(1.0 - lr * weight_decay)
            x.addcdiv_(m.clamp(-tau, tau), d, value=-2.0 * lr)
        v.lerp_(g * g, 1.0 - beta2)
    return unclipped


def _acclip_adaptive_foreach(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                             sq_avgs: list[Tensor], scratch: list[Tensor], *, lr: float, beta1: float, beta2: float,
                             eps: float, weight_decay: float) -> list[Tensor]:
    unclipped: list[Tensor] = []
    for ps, gs, ms, vs, ds in by_device_and_dtype(params, grads, exp_avgs, sq_avgs, scratch):
        torch._foreach_lerp_(ms, gs, 1.0 - beta1)
        torch._foreach_copy_(ds, vs)  # d = eps + sqrt(beta2 v), from v before this step's gradient
        torch._foreach_mul_(ds, beta2)
        torch._foreach_sqrt_(ds)
        torch._foreach_add_(ds, eps)
        taus = torch._foreach_div(ds, math.sqrt(1.0 - beta2))
        steps = torch._foreach_minimum(ms, taus)
        torch._foreach_maximum_(steps, torch._foreach_neg(taus))
        unclipped.extend((m.abs() <= t).sum() for m, t in zip(ms, taus, strict=True))
        with state_precision(ps, foreach=True) as xs:
            if weight_decay != 0:
                torch._foreach_mul_(xs, 1.0 - lr * weight_decay)
            torch._foreach_addcdiv_(xs, steps, ds, value=-2.0 * lr)
        torch._foreach_lerp_(vs, torch._foreach_mul(gs, gs), 1.0 - beta2)
    return unclipped
