"""Clipped SGD: global-norm clipping (GClip) and coordinate-wise clipping (CClip)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_opt._validation import check_choice, check_float
from lightning_opt.optim._base import ClipOptimizerBase, GroupGrads, Stats
from lightning_opt.optim._sgd import check_momentum, scaled_norm, sgd_state, sgd_update
from lightning_opt.optim._tensor_lists import by_device_and_dtype, scratch_or_new, state_precision

__all__ = ["ClippedSGD", "cclip_momentum"]

SCOPES = ("global", "coordinate")
CLIP_TARGETS = ("gradient", "momentum")


class ClippedSGD(ClipOptimizerBase):
    r"""Stochastic gradient descent on a clipped gradient: GClip (``scope="global"``) or CClip
    (``scope="coordinate"``).

    **GClip** -- thesis eq. (3.5) and §4.4.1 (GClip):

    .. math:: x_{k+1} = x_k - \eta\,\min\Big\{1, \frac{\tau}{\lVert g_k\rVert}\Big\}\,g_k ,

    where :math:`\lVert g_k\rVert` is the 2-norm of the gradient over *all* parameters of the optimizer (all
    param groups), :math:`\eta` = ``lr`` and :math:`\tau` = ``max_norm``. (Eq. (3.5) writes the same step as
    :math:`h_c = \min\{\eta_c, \gamma\eta_c/\lVert\nabla f\rVert\}`, i.e. :math:`\gamma = \tau`.)

    **CClip** -- thesis §4.5.1 (CClip): every coordinate is clipped on its own,
    :math:`\hat g_i = \min\{\tau/|g_i|, 1\}\,g_i = \operatorname{clamp}(g_i, -\tau, \tau)`; ``max_norm`` is
    then the per-coordinate threshold :math:`\tau`.

    Weight decay and momentum follow ``torch.optim.SGD`` and, by default (``clip="gradient"``), act on the
    *clipped* gradient: with :math:`d_k = \hat g_k + \lambda x_k`,
    :math:`b_k = \mu b_{k-1} + d_k` (:math:`b_0 = 0`), the step is :math:`x_{k+1} = x_k - \eta b_k`, or
    :math:`x_{k+1} = x_k - \eta (d_k + \mu b_k)` with ``nesterov=True``. Hence ``ClippedSGD(scope="global")``
    is ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` followed by ``torch.optim.SGD(...).step()`` (up
    to the ``1e-6`` that ``clip_grad_norm_`` adds to the norm), without modifying ``p.grad``.

    **CClip on the momentum** (``clip="momentum"``, ``scope="coordinate"`` only) is the thesis' own form,
    §4.5.1 eq. (CClip): :math:`\operatorname{CClip}(\tau, m_k) = \min\{\tau/|m_k|, 1\}\,m_k`, the momentum
    accumulated from the *raw* gradient and clipped when it is used, as ACClip does. Here
    :math:`d_k = g_k + \lambda x_k`, :math:`b_k = \mu b_{k-1} + d_k` and
    :math:`x_{k+1} = x_k - \eta\,\operatorname{clamp}(b_k, -\tau, \tau)` (Nesterov: the direction
    :math:`d_k + \mu b_k` is clipped). Without momentum both forms coincide. The thesis' momentum is the average
    :math:`m_k = (1-\mu)b_k`; its threshold :math:`\tau` and step :math:`\eta` are ours as
    :math:`\tau/(1-\mu)` and :math:`\eta(1-\mu)`.

    Args:
        params: parameters or param groups.
        lr: step size :math:`\eta \ge 0`.
        max_norm: clipping threshold :math:`\tau > 0` (global norm, or per-coordinate magnitude for CClip).
        momentum: heavy-ball coefficient :math:`\mu \in [0, 1)`.
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        weight_decay: L2 coefficient :math:`\lambda \ge 0` (added after clipping).
        scope: ``"global"`` (GClip) or ``"coordinate"`` (CClip); the same for all param groups.
        clip: ``"gradient"`` (clip, then accumulate momentum) or ``"momentum"`` (accumulate, then clip the
            momentum; needs ``scope="coordinate"``); the same for all param groups.
        maximize: maximise the objective (the gradient is negated before everything else).
        foreach: multi-tensor ``torch._foreach_*`` path (``None`` = yes) or per-tensor reference path.
        nonfinite: ``"skip"`` (skip the step, count it in :attr:`nonfinite_steps`, warn) or ``"raise"``
            (:class:`NonFiniteGradientError`); either way nothing is written in that step.

    Statistics of the last step, :attr:`last_stats` (0-d tensors): ``grad_norm`` (global 2-norm of the raw
    gradient), ``post_clip_norm`` (2-norm of the clipped gradient), ``clip_scale`` (GClip:
    :math:`\min\{1, \tau/\lVert g\rVert\}`, or with different ``max_norm`` per group the overall ratio
    ``post_clip_norm / grad_norm``; CClip: 1), ``clip_fraction`` (fraction of gradient coordinates changed by
    clipping: GClip the share in groups whose factor is < 1, CClip the share of :math:`|g_i| > \tau`, or of
    clipped momentum coordinates with ``clip="momentum"``), ``skipped``.
    """

    def __init__(
        self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3, max_norm: float = 1.0,
        momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0, scope: str = "global",
        clip: str = "gradient", *, maximize: bool = False, foreach: bool | None = None, nonfinite: str = "skip",
    ) -> None:
        defaults = dict(lr=lr, max_norm=max_norm, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        scope=scope, clip=clip, maximize=maximize, foreach=foreach)
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _validate_hyper(self, owner: str, group: dict[str, Any]) -> None:
        check_float("max_norm", group["max_norm"], 0.0, low_open=True, owner=owner)
        check_momentum(owner, group)
        check_choice("scope", group["scope"], SCOPES, owner=owner)
        check_choice("clip", group["clip"], CLIP_TARGETS, owner=owner)
        if group["clip"] == "momentum" and group["scope"] != "coordinate":
            raise ValueError(f"{owner}: invalid clip='momentum' with scope={group['scope']!r}; expected "
                             "scope='coordinate' (clipping the momentum is CClip's form) or clip='gradient'")
        for key in ("scope", "clip"):
            if hasattr(self, "defaults") and group[key] != self.defaults[key]:
                raise ValueError(f"{owner}: invalid {key}={group[key]!r} in a param group; expected the "
                                 f"constructor's {key}={self.defaults[key]!r} (the {key} is optimizer-wide)")

    def _update(self, batches: list[GroupGrads], norm: Tensor, norm_value: float) -> Stats:
        scaled: list[tuple[float, list[Tensor]]] = []  # GClip: each group's factor (for the statistics)
        post_norms: list[Tensor] = []  # CClip: norms of the clipped directions, numbers of clipped coordinates
        clipped: list[Tensor] = []
        numel = 0
        for b in batches:
            bufs, hyper = sgd_state(self.state, b)
            tau = float(b.group["max_norm"])
            if b.group["scope"] == "global":  # eq. (3.5): min{1, tau / ||g||}, ||g|| over all param groups
                scale = min(1.0, tau / norm_value) if norm_value > 0 else 1.0
                scaled.append((scale, b.grads))
                sgd_update(b.params, b.grads, bufs, scale=scale, **hyper, foreach=b.foreach)
                continue
            cclip = cclip_momentum if b.group["clip"] == "momentum" else cclip_gradient
            scratch = self._scratch(b.params) if b.foreach else None
            norms, counts = cclip(b.params, b.grads, bufs, scratch, tau, **hyper, foreach=b.foreach)
            post_norms.extend(n.to(norm.device) for n in norms)
            clipped.extend(c.to(norm.device) for c in counts)
            numel += sum(g.numel() for g in b.grads)
        return _clip_stats(norm, norm_value, scaled, post_norms, clipped, numel)


def _clip_stats(norm: Tensor, norm_value: float, scaled: list[tuple[float, list[Tensor]]], post_norms: list[Tensor],
                clipped: list[Tensor], numel: int) -> Stats:
    """ClippedSGD's :attr:`last_stats` entries, built lazily on the device (no host sync): GClip's from the
    groups' factors, CClip's from the per-tensor norms and clipped counts of the clipped directions."""
    device = norm.device
    global_post = scaled_norm(norm, scaled) if scaled else None

    def entries() -> dict[str, Tensor]:
        if global_post is not None:  # GClip: a group's coordinates are all scaled, or none
            post, fraction = global_post()
            clip_scale = post / norm if norm_value > 0 else torch.ones((), device=device)
        else:  # CClip: share of clipped coordinates
            fraction = torch.stack(clipped).sum().float() / numel
            post = torch.linalg.vector_norm(torch.stack(post_norms).to(norm.dtype))
            clip_scale = torch.ones((), device=device)
        return {"post_clip_norm": post.float(), "clip_scale": clip_scale.float(), "clip_fraction": fraction.float()}

    return entries


CClipResult = tuple[list[Tensor], list[Tensor]]


def cclip_gradient(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor] | None,
                   scratch: list[Tensor] | None, tau: float, *, lr: float, weight_decay: float, momentum: float,
                   nesterov: bool, foreach: bool) -> CClipResult:
    """Thesis §4.5.1 (CClip) on the gradient, then SGD: d = clamp(g, −τ, τ) + λx, b ← μb + d, x ← x − ηb
    (Nesterov: x ← x − η(d + μb)). ``scratch`` (foreach path) holds the clipped gradients. Returns the clipped
    gradients' norms and the numbers of clipped coordinates, per tensor."""
    hyper = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov)
    if foreach:
        return _cclip_gradient_foreach(params, grads, bufs, scratch_or_new(scratch, grads), tau, **hyper)
    return _cclip_gradient_single(params, grads, bufs, tau, **hyper)


def _cclip_gradient_single(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor] | None, tau: float,
                           **hyper: Any) -> CClipResult:
    clipped = [g.clamp(-tau, tau) for g in grads]
    norms = [torch.linalg.vector_norm(c) for c in clipped]
    counts = [(g.abs() > tau).sum() for g in grads]
    sgd_update(params, clipped, bufs, scale=1.0, **hyper, foreach=False)
    return norms, counts


def _cclip_gradient_foreach(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor] | None,
                            scratch: list[Tensor], tau: float, **hyper: Any) -> CClipResult:
    norms: list[Tensor] = []
    counts: list[Tensor] = []
    for _, gs, cs in by_device_and_dtype(params, grads, scratch):
        torch._foreach_copy_(cs, gs)
        torch._foreach_clamp_max_(cs, tau)
        torch._foreach_clamp_min_(cs, -tau)
        norms.extend(torch._foreach_norm(cs))
    sgd_update(params, scratch, bufs, scale=1.0, **hyper, foreach=True)
    for _, gs, cs in by_device_and_dtype(params, grads, scratch):  # sign(clamp(g) - g) is ±1 exactly where clipped
        torch._foreach_sub_(cs, gs)
        torch._foreach_sign_(cs)
        counts.extend(torch._foreach_norm(cs, 1))
    return norms, counts


def cclip_momentum(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor] | None,
                   scratch: list[Tensor] | None, tau: float, *, lr: float, weight_decay: float, momentum: float,
                   nesterov: bool, foreach: bool) -> CClipResult:
    """Thesis §4.5.1 (CClip) on the momentum: b ← μb + g + λx, x ← x − η clamp(b, −τ, τ) (Nesterov: the
    direction g + λx + μb is clipped); ``scratch`` (foreach path) holds the directions. Returns the clipped
    directions' norms and the numbers of clipped coordinates, per tensor."""
    hyper = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov)
    if foreach:
        return _cclip_momentum_foreach(params, grads, bufs, scratch_or_new(scratch, grads), tau, **hyper)
    return _cclip_momentum_single(params, grads, bufs, tau, **hyper)


def _cclip_momentum_single(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor] | None, tau: float, *,
                           lr: float, weight_decay: float, momentum: float, nesterov: bool) -> CClipResult:
    norms: list[Tensor] = []
    counts: list[Tensor] = []
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        with state_precision([p], foreach=False) as (x,):
            d = torch.add(g, x, alpha=weight_decay) if weight_decay != 0 else g.clone()  # d = g + λx
            if bufs is not None:
                bufs[i].mul_(momentum).add_(d)
                d = d.add_(bufs[i], alpha=momentum) if nesterov else d.copy_(bufs[i])
            counts.append((d.abs() > tau).sum())
            d.clamp_(-tau, tau)
            norms.append(torch.linalg.vector_norm(d))
            x.add_(d, alpha=-lr)
    return norms, counts


def _cclip_momentum_foreach(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor] | None,
                            scratch: list[Tensor], tau: float, *, lr: float, weight_decay: float, momentum: float,
                            nesterov: bool) -> CClipResult:
    norms: list[Tensor] = []
    counts: list[Tensor] = []
    for ps, gs, ds, bs in by_device_and_dtype(params, grads, scratch, bufs):
        with state_precision(ps, foreach=True) as xs:
            torch._foreach_copy_(ds, gs)  # d = g + λx
            if weight_decay != 0:
                torch._foreach_add_(ds, xs, alpha=weight_decay)
            if bs is not None:
                torch._foreach_mul_(bs, momentum)
                torch._foreach_add_(bs, ds)
                if nesterov:
                    torch._foreach_add_(ds, bs, alpha=momentum)
                else:
                    torch._foreach_copy_(ds, bs)
            counts.extend((d.abs() > tau).sum() for d in ds)
            torch._foreach_clamp_max_(ds, tau)
            torch._foreach_clamp_min_(ds, -tau)
            norms.extend(torch._foreach_norm(ds))
            torch._foreach_add_(xs, ds, alpha=-lr)
    return norms, counts
