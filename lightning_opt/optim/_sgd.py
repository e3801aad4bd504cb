"""The SGD step that ClippedSGD and NormalizedSGD take on their transformed gradient (``torch.optim.SGD``'s weight
decay, heavy-ball and Nesterov momentum), its hyperparameter checks, and the statistics of a gradient whose param
groups were scaled by their own factors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_opt._validation import check_bool, check_float
from lightning_opt.optim._base import GroupGrads, zeros_state
from lightning_opt.optim._tensor_lists import by_device_and_dtype, state_precision

__all__ = ["check_momentum", "scaled_norm", "sgd_state", "sgd_update"]


def check_momentum(owner: str, group: dict[str, Any]) -> float:
    """``momentum`` in [0, 1) and ``nesterov`` a bool that needs momentum > 0."""
    momentum = check_float("momentum", group["momentum"], 0.0, 1.0, high_open=True, owner=owner)
    if check_bool("nesterov", group["nesterov"], owner=owner) and momentum == 0:
        raise ValueError(f"{owner}: invalid nesterov=True with momentum={group['momentum']!r}; expected "
                         "momentum in (0, 1) (Nesterov momentum needs momentum)")
    return momentum


def sgd_state(state: dict[Any, dict[str, Any]], batch: GroupGrads) -> tuple[list[Tensor] | None, dict[str, Any]]:
    """The momentum buffers of ``batch``'s parameters (``torch.optim.SGD``'s ``momentum_buffer``, zeros at a
    parameter's first step; ``None`` without momentum) and the group's SGD hyperparameters as plain numbers."""
    group = batch.group
    hyper = dict(lr=float(group["lr"]), weight_decay=float(group["weight_decay"]),
                 momentum=float(group["momentum"]), nesterov=bool(group["nesterov"]))
    bufs = zeros_state(state, batch.params, "momentum_buffer")[0] if hyper["momentum"] != 0 else None
    return bufs, hyper


def sgd_update(params: list[Tensor], directions: list[Tensor], bufs: list[Tensor] | None, *, lr: float,
               scale: float, weight_decay: float, momentum: float, nesterov: bool, foreach: bool) -> None:
    """``x <- x - lr * d`` where ``d`` is the SGD (+ heavy-ball / Nesterov momentum) direction built from
    ``scale * directions + weight_decay * x``; ``bufs`` are the momentum buffers (``None`` when momentum is 0).
    ``directions`` (state precision) are only read."""
    fn = _sgd_update_foreach if foreach else _sgd_update_single
    fn(params, directions, bufs, lr=lr, scale=scale, weight_decay=weight_decay, momentum=momentum,
       nesterov=nesterov)


def _sgd_update_single(params: list[Tensor], directions: list[Tensor], bufs: list[Tensor] | None, *, lr: float,
                       scale: float, weight_decay: float, momentum: float, nesterov: bool) -> None:
    """The per-tensor reference: ``d = s g + wd x``; ``b <- mu b + d``; ``x <- x - lr b`` (Nesterov:
    ``x <- x - lr (d + mu b)``)."""
    for i, (p, g) in enumerate(zip(params, directions, strict=True)):
        with state_precision([p], foreach=False) as (x,):
            d = g * scale
            if weight_decay != 0:
                d = d + weight_decay * x
            if momentum != 0:
                assert bufs is not None
                buf = bufs[i]
                buf.mul_(momentum).add_(d)
                d = d + momentum * buf if nesterov else buf
            x.add_(d, alpha=-lr)


def _sgd_update_foreach(params: list[Tensor], directions: list[Tensor], bufs: list[Tensor] | None, *, lr: float,
                        scale: float, weight_decay: float, momentum: float, nesterov: bool) -> None:
    """The same step reordered so that no temporary is allocated (equal up to rounding):
    ``b <- mu b + s g + wd x``; ``x <- x - lr b`` or, Nesterov, ``x <- x (1 - lr wd) - lr s g - lr mu b``."""
    for ps, gs, bs in by_device_and_dtype(params, directions, bufs):
        with state_precision(ps, foreach=True) as xs:
            if momentum != 0:  # b <- mu b + s g + wd x, reading x before the step writes it
                torch._foreach_mul_(bs, momentum)
                torch._foreach_add_(bs, gs, alpha=scale)
                if weight_decay != 0:
                    torch._foreach_add_(bs, xs, alpha=weight_decay)
            if momentum != 0 and not nesterov:
                torch._foreach_add_(xs, bs, alpha=-lr)
            else:  # plain SGD, or Nesterov's x (1 - lr wd) - lr s g - lr mu b
                if weight_decay != 0:
                    torch._foreach_mul_(xs, 1.0 - lr * weight_decay)
                torch._foreach_add_(xs, gs, alpha=-lr * scale)
                if momentum != 0:
                    torch._foreach_add_(xs, bs, alpha=-lr * momentum)


def scaled_norm(norm: Tensor, scaled: list[tuple[float, list[Tensor]]]) -> Callable[[], tuple[Tensor, Tensor]]:
    """For :attr:`last_stats` of a gradient whose parameter groups were multiplied by their own factors: a builder
    of (the 2-norm of the scaled gradient, the share of coordinates whose factor is < 1). ``norm`` is the 2-norm
    of the whole raw gradient; ``scaled`` lists (factor, the group's gradients). One factor for all groups costs
    nothing now (``norm · s``, built when read); differing per-group thresholds take per-group norms now, before
    the next backward overwrites the gradients (device ops, no host sync)."""
    factors = {s for s, grads in scaled if grads}

    def fraction() -> Tensor:
        numel = sum(g.numel() for _, grads in scaled for g in grads)
        shrunk = sum(g.numel() for s, grads in scaled if s < 1.0 for g in grads)
        return torch.full((), shrunk / max(1, numel), device=norm.device)

    if len(factors) <= 1:
        factor = factors.pop() if factors else 1.0
        return lambda: (norm * factor, fraction())
    squares = [torch.stack(torch._foreach_norm(grads)).to(norm.device, norm.dtype).square().sum() * (s * s)
               for s, grads in scaled if grads]
    post = torch.stack(squares).sum().sqrt()
    return lambda: (post, fraction())
