"""Normalised (stochastic) gradient descent."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_opt._validation import check_float
from lightning_opt.optim._base import ClipOptimizerBase, GroupGrads, Stats
from lightning_opt.optim._sgd import check_momentum, scaled_norm, sgd_state, sgd_update

__all__ = ["NormalizedSGD"]


class NormalizedSGD(ClipOptimizerBase):
    r"""Normalised gradient descent, thesis eq. (3.6):

    .. math:: x_{k+1} = x_k - \frac{\eta}{\lVert g_k\rVert + \beta}\, g_k ,

    with :math:`\lVert g_k\rVert` the 2-norm of the gradient over all parameters of the optimizer (all param
    groups), :math:`\eta` = ``lr`` and :math:`\beta` = ``beta``. For :math:`\lVert g\rVert \ll \beta` this is
    SGD with step :math:`\eta/\beta`; for :math:`\lVert g\rVert \gg \beta` a step of length :math:`\eta`. The
    thesis (§3.3.1) notes it equals GClip up to a factor 2 in the step size (:math:`\gamma\eta_c = \eta_n`,
    :math:`\eta_c = \eta_n/\beta`).

    Weight decay and momentum (extensions, as in :class:`ClippedSGD`) act on the normalised gradient:
    :math:`d_k = g_k/(\lVert g_k\rVert+\beta) + \lambda x_k`, :math:`b_k = \mu b_{k-1} + d_k`,
    :math:`x_{k+1} = x_k - \eta b_k` (``nesterov``: :math:`x_{k+1} = x_k - \eta(d_k + \mu b_k)`). The decay is
    thus not normalised: its rate :math:`\eta\lambda` does not depend on the gradient norm.

    With ``beta=0`` and a zero gradient the step is zero (no 0/0).

    Args:
        params: parameters or param groups.
        lr: step size :math:`\eta \ge 0`.
        beta: :math:`\beta \ge 0` added to the norm.
        momentum: heavy-ball coefficient :math:`\mu \in [0, 1)`.
        weight_decay: L2 coefficient :math:`\lambda \ge 0`.
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        maximize, foreach, nonfinite: as in :class:`ClippedSGD` (``nonfinite``: ``"skip"`` or ``"raise"``).

    :attr:`last_stats` (0-d tensors): ``grad_norm`` (raw gradient), ``post_clip_norm``
    (:math:`\lVert g\rVert/(\lVert g\rVert+\beta)`; with different β per group, the 2-norm of the normalised
    gradient), ``clip_scale`` (:math:`1/(\lVert g\rVert + \beta)`, the factor applied to the gradient before
    ``lr``; with different β per group, ``post_clip_norm / grad_norm``), ``skipped``.
    """

    def __init__(
        self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3, beta: float = 1.0,
        momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
        foreach: bool | None = None, nonfinite: str = "skip",
    ) -> None:
        defaults = dict(lr=lr, beta=beta, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, foreach=foreach)
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _validate_hyper(self, owner: str, group: dict[str, Any]) -> None:
        check_float("beta", group["beta"], 0.0, owner=owner)
        check_momentum(owner, group)

    def _update(self, batches: list[GroupGrads], norm: Tensor, norm_value: float) -> Stats:
        scaled: list[tuple[float, list[Tensor]]] = []  # each group's factor (for the statistics)
        for b in batches:
            denom = norm_value + float(b.group["beta"])  # eq. (3.6): g / (||g|| + beta), ||g|| over all groups
            scale = 1.0 / denom if denom > 0 else 0.0
            scaled.append((scale, b.grads))
            bufs, hyper = sgd_state(self.state, b)
            sgd_update(b.params, b.grads, bufs, scale=scale, **hyper, foreach=b.foreach)
        post = scaled_norm(norm, scaled)
        factors = {s for s, _ in scaled}

        def entries() -> dict[str, Tensor]:
            scaled_post = post()[0]
            if len(factors) == 1:
                clip_scale = torch.full((), next(iter(factors)), device=norm.device)
            else:
                clip_scale = scaled_post / norm if norm_value > 0 else torch.zeros((), device=norm.device)
            return {"post_clip_norm": scaled_post.float(), "clip_scale": clip_scale.float()}

        return entries
