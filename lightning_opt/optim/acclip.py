"""ACClip: adaptive coordinate-wise clipping with momentum."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_opt.optim._common import (
    ClipOptimizerBase,
    buckets,
    check_beta,
    check_bool,
    check_interval,
    check_positive,
    pick,
    state_dtype,
    total_norm,
    working_copies,
    write_back,
)

__all__ = ["ACClip", "acclip_adaptive"]


def _abs_pow(t: Tensor, alpha: float) -> Tensor:
    """|t|^alpha (a new tensor); the per-tensor path's spelling of what the foreach path does in place."""
    return t * t if alpha == 2.0 else t.abs().pow_(alpha)


def _root(ts: list[Tensor], alpha: float, foreach: bool) -> list[Tensor]:
    """t^(1/alpha); the input itself when alpha == 1."""
    if alpha == 1.0:
        return ts
    if foreach:
        return torch._foreach_sqrt(ts) if alpha == 2.0 else torch._foreach_pow(ts, 1.0 / alpha)
    return [t.sqrt() if alpha == 2.0 else t.pow(1.0 / alpha) for t in ts]


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
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        alpha: float | None = None,
        eps: float = 1e-5,
        weight_decay: float = 1e-5,
        *,
        adaptive: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "skip",
    ) -> None:
        self.adaptive = bool(check_bool("ACClip", "adaptive", adaptive))
        defaults = dict(
            lr=lr,
            betas=betas,
            alpha=(2.0 if adaptive else 1.0) if alpha is None else alpha,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            foreach=foreach,
        )
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _validate_hyper(self, name: str, group: dict[str, Any]) -> None:
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{name}: invalid betas={betas!r}; expected a pair (beta1, beta2) in [0, 1)")
        check_beta(name, "betas[0]", betas[0])
        check_beta(name, "betas[1]", betas[1])
        check_interval(name, "alpha", group["alpha"], 0.0, 2.0, low_open=True, high_open=False)
        if self.adaptive and group["alpha"] != 2.0:
            raise ValueError(f"{name}: invalid alpha={group['alpha']!r} with adaptive=True; the adaptive step uses "
                             "the second moment (accepted: alpha=2 or None)")
        check_positive(name, "eps", group["eps"])

    def _states(self, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        ms, ts = [], []
        for p in params:
            st = self.state[p]
            if "exp_avg" not in st:
                st["exp_avg"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
                st["tau_alpha"] = torch.zeros_like(
                    p, dtype=state_dtype(p), memory_format=torch.preserve_format
                )
            ms.append(st["exp_avg"])
            ts.append(st["tau_alpha"])
        return ms, ts

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimisation step (see the class docstring); returns the closure's loss, if any."""
        loss = self._closure_loss(closure)
        collected = [self._collect(group) for group in self.param_groups]
        norm = total_norm(
            (grads, self._foreach(group))
            for group, (_, grads) in zip(self.param_groups, collected, strict=True)
        )
        if norm is None or self._check_finite(norm) is None:
            return loss
        device = norm.device
        unclipped: list[Tensor] = []  # per tensor: number of coordinates with clip factor == 1
        numel = 0
        for group, (params, grads) in zip(self.param_groups, collected, strict=True):
            if not params:
                continue
            foreach = self._foreach(group)
            lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
            beta1, beta2 = (float(b) for b in group["betas"])
            alpha = float(group["alpha"])
            exp_avgs, tau_alphas = self._states(params)
            numel += sum(g.numel() for g in grads)
            if self.adaptive:
                unclipped.extend(c.to(device) for c in acclip_adaptive(
                    params, grads, exp_avgs, tau_alphas, self._scratch(params), lr=lr, beta1=beta1, beta2=beta2,
                    eps=eps, weight_decay=wd, foreach=foreach))
                continue
            if not foreach:
                for p, g, m, ta in zip(params, grads, exp_avgs, tau_alphas, strict=True):
                    m.lerp_(g, 1.0 - beta1)
                    ta.lerp_(_abs_pow(g, alpha), 1.0 - beta2)
                    tau = _root([ta], alpha, False)[0]
                    ratio = (tau / (m.abs() + eps)).clamp_(max=1.0)
                    unclipped.append((ratio == 1.0).sum().to(device))
                    w = working_copies([p])[0]
                    if wd != 0:
                        w.mul_(1.0 - lr * wd)
                    w.addcmul_(ratio, m, value=-lr)
                    write_back([p], [w], foreach=False)
                continue
            scratch = self._scratch(params)
            for idx in buckets(params):
                ps, gs, ss = pick(params, idx), pick(grads, idx), pick(scratch, idx)
                ms, tas = pick(exp_avgs, idx), pick(tau_alphas, idx)
                torch._foreach_lerp_(ms, gs, 1.0 - beta1)
                torch._foreach_copy_(ss, gs)  # |g|^alpha, in the scratch buffer
                torch._foreach_abs_(ss)
                if alpha == 2.0:
                    torch._foreach_mul_(ss, ss)
                elif alpha != 1.0:
                    torch._foreach_pow_(ss, alpha)
                torch._foreach_lerp_(tas, ss, 1.0 - beta2)
                # r = (|m| + eps) / tau clamped below at 1: g_hat = m / r = min{tau / (|m| + eps), 1} m
                torch._foreach_copy_(ss, ms)
                torch._foreach_abs_(ss)
                torch._foreach_add_(ss, eps)
                torch._foreach_div_(ss, _root(tas, alpha, True))
                torch._foreach_clamp_min_(ss, 1.0)
                ws = working_copies(ps)
                if wd != 0:
                    torch._foreach_mul_(ws, 1.0 - lr * wd)
                torch._foreach_addcdiv_(ws, ms, ss, value=-lr)
                write_back(ps, ws, foreach=True)
                # 1 / r is in [0, 1]; its floor is 1 exactly where the coordinate is not clipped
                torch._foreach_reciprocal_(ss)
                torch._foreach_floor_(ss)
                unclipped.extend(n.to(device) for n in torch._foreach_norm(ss, 1))
        norm = norm.detach()

        def build() -> dict[str, Tensor]:  # lazily, on the device, no host sync
            kept = torch.stack(unclipped).sum().float() if unclipped else torch.zeros((), device=device)
            return {
                "grad_norm": norm,
                "clip_fraction": 1.0 - kept / max(numel, 1),
                "skipped": torch.zeros((), device=device),
            }

        self._set_stats(build)
        self._steps += 1
        return loss


def acclip_adaptive(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], sq_avgs: list[Tensor],
                    scratch: list[Tensor], *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                    foreach: bool) -> list[Tensor]:
    """Thesis §7.2.1 per coordinate: d = ε + √(β₂ v), m ← β₁m + (1 − β₁)g,
    x ← (1 − ηλ)x − (2η/d)·clamp(m, −d/√(1 − β₂), d/√(1 − β₂)), then v ← β₂v + (1 − β₂)g². Returns the number of
    unclipped coordinates per tensor."""
    unclipped: list[Tensor] = []
    groups = buckets(params) if foreach else [[i] for i in range(len(params))]
    for idx in groups:
        ps, gs, ms, vs, ds = (pick(t, idx) for t in (params, grads, exp_avgs, sq_avgs, scratch))
        torch._foreach_lerp_(ms, gs, 1.0 - beta1)
        torch._foreach_copy_(ds, vs)  # d = eps + sqrt(beta2 v), from v before this step's gradient
        torch._foreach_mul_(ds, beta2)
        torch._foreach_sqrt_(ds)
        torch._foreach_add_(ds, eps)
        taus = torch._foreach_div(ds, math.sqrt(1.0 - beta2))
        steps = torch._foreach_minimum(ms, taus)
        torch._foreach_maximum_(steps, torch._foreach_neg(taus))
        unclipped.extend((m.abs() <= t).sum() for m, t in zip(ms, taus, strict=True))
        ws = working_copies(ps)
        if weight_decay != 0:
            torch._foreach_mul_(ws, 1.0 - lr * weight_decay)
        torch._foreach_addcdiv_(ws, steps, ds, value=-2.0 * lr)
        write_back(ps, ws, foreach=foreach)
        torch._foreach_lerp_(vs, torch._foreach_mul(gs, gs), 1.0 - beta2)
    return unclipped
