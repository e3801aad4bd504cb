"""Clipped SGD: global-norm clipping (GClip) and coordinate-wise clipping (CClip)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_opt.optim._common import (
    ClipOptimizerBase,
    buckets,
    check_choice,
    check_momentum,
    check_positive,
    pick,
    scaled_norm,
    sgd_update,
    state_dtype,
    total_norm,
    working_copies,
    write_back,
)

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
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        max_norm: float = 1.0,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        scope: str = "global",
        clip: str = "gradient",
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "skip",
    ) -> None:
        defaults = dict(
            lr=lr,
            max_norm=max_norm,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            scope=scope,
            clip=clip,
            maximize=maximize,
            foreach=foreach,
        )
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _validate_hyper(self, name: str, group: dict[str, Any]) -> None:
        check_positive(name, "max_norm", group["max_norm"])
        check_momentum(name, group)
        check_choice(name, "scope", group["scope"], SCOPES)
        check_choice(name, "clip", group["clip"], CLIP_TARGETS)
        if group["clip"] == "momentum" and group["scope"] != "coordinate":
            raise ValueError(f"{name}: invalid clip='momentum' with scope={group['scope']!r}; clipping the "
                             "momentum is CClip's form (accepted: scope='coordinate', or clip='gradient')")
        for key in ("scope", "clip"):
            if hasattr(self, "defaults") and group[key] != self.defaults[key]:
                raise ValueError(
                    f"{name}: invalid {key}={group[key]!r} in a param group; the {key} is optimizer-wide "
                    f"(accepted: the constructor's {key}={self.defaults[key]!r})"
                )

    def _bufs(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor] | None:
        if group["momentum"] == 0:
            return None
        bufs = []
        for p in params:
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(
                    p, dtype=state_dtype(p), memory_format=torch.preserve_format
                )
            bufs.append(st["momentum_buffer"])
        return bufs

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimisation step (see the class docstring); returns the closure's loss, if any."""
        loss = self._closure_loss(closure)
        collected = [self._collect(group) for group in self.param_groups]
        norm = total_norm(
            (grads, self._foreach(group))
            for group, (_, grads) in zip(self.param_groups, collected, strict=True)
        )
        norm_value = None if norm is None else self._check_finite(norm)  # the step's one host sync
        if norm is None or norm_value is None:
            return loss
        device = norm.device
        scaled: list[tuple[float, list[Tensor]]] = []  # GClip: each group's factor (for the statistics)
        clipped_count: list[Tensor] = []
        post_norms: list[Tensor] = []  # CClip: norms of the clipped gradient
        numel = 0
        for group, (params, grads) in zip(self.param_groups, collected, strict=True):
            if not params:
                continue
            foreach = self._foreach(group)
            tau = float(group["max_norm"])
            kwargs = dict(
                lr=float(group["lr"]),
                weight_decay=float(group["weight_decay"]),
                momentum=float(group["momentum"]),
                nesterov=bool(group["nesterov"]),
                foreach=foreach,
            )
            bufs = self._bufs(group, params)
            if group["scope"] == "global":
                scale = min(1.0, tau / norm_value) if norm_value > 0 else 1.0
                scaled.append((scale, grads))
                sgd_update(params, grads, bufs, scale=scale, **kwargs)
                continue
            # CClip: clamp(g, -tau, tau)
            numel += sum(g.numel() for g in grads)
            if group["clip"] == "momentum":
                norms, counts = cclip_momentum(params, grads, bufs, self._scratch(params), tau, **kwargs)
                post_norms.extend(n.to(device) for n in norms)
                clipped_count.extend(c.to(device) for c in counts)
            elif foreach:
                clipped = self._scratch(params)
                for idx in buckets(params):
                    gs, cs = pick(grads, idx), pick(clipped, idx)
                    torch._foreach_copy_(cs, gs)
                    torch._foreach_clamp_max_(cs, tau)
                    torch._foreach_clamp_min_(cs, -tau)
                    post_norms.extend(n.to(device) for n in torch._foreach_norm(cs))
                sgd_update(params, clipped, bufs, scale=1.0, **kwargs)
                for idx in buckets(params):  # count: sign(clamp(g) - g) is +-1 exactly where clipped
                    gs, cs = pick(grads, idx), pick(clipped, idx)
                    torch._foreach_sub_(cs, gs)
                    torch._foreach_sign_(cs)
                    clipped_count.extend(n.to(device) for n in torch._foreach_norm(cs, 1))
            else:
                clipped = [g.clamp(-tau, tau) for g in grads]
                post_norms.extend(torch.linalg.vector_norm(c).to(device) for c in clipped)
                clipped_count.extend((g.abs() > tau).sum().to(device) for g in grads)
                sgd_update(params, clipped, bufs, scale=1.0, **kwargs)
        norm = norm.detach()
        global_post = scaled_norm(norm, scaled) if scaled else None

        def build() -> dict[str, Tensor]:  # lazily, on the device, no host sync
            if global_post is not None:  # GClip: a group's coordinates are all scaled, or none
                post, fraction = global_post()
                clip_scale = post / norm if norm_value > 0 else torch.ones((), device=device)
            else:  # CClip: share of |g_i| > tau
                fraction = torch.stack(clipped_count).sum().float() / numel
                post = torch.linalg.vector_norm(torch.stack(post_norms).to(norm.dtype))
                clip_scale = torch.ones((), device=device)
            return {
                "grad_norm": norm,
                "post_clip_norm": post.float(),
                "clip_scale": clip_scale.float(),
                "clip_fraction": fraction.float(),
                "skipped": torch.zeros((), device=device),
            }

        self._set_stats(build)
        self._steps += 1
        return loss


def cclip_momentum(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor] | None, scratch: list[Tensor],
                   tau: float, *, lr: float, weight_decay: float, momentum: float, nesterov: bool,
                   foreach: bool) -> tuple[list[Tensor], list[Tensor]]:
    """Thesis §4.5.1 (CClip) on the momentum: b ← μb + g + λx, x ← x − η clamp(b, −τ, τ) (Nesterov: the
    direction g + λx + μb is clipped); ``scratch`` holds the directions. Returns the clipped directions' norms
    and the numbers of clipped coordinates, per tensor."""
    norms: list[Tensor] = []
    counts: list[Tensor] = []
    groups = buckets(params) if foreach else [[i] for i in range(len(params))]
    for idx in groups:
        ps, ds = pick(params, idx), pick(scratch, idx)
        ws = working_copies(ps)
        torch._foreach_copy_(ds, pick(grads, idx))  # d = g + λx
        if weight_decay != 0:
            torch._foreach_add_(ds, ws, alpha=weight_decay)
        if bufs is not None:
            bs = pick(bufs, idx)
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
        torch._foreach_add_(ws, ds, alpha=-lr)
        write_back(ps, ws, foreach=foreach)
    return norms, counts
