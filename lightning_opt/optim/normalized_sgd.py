"""Normalised (stochastic) gradient descent."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_opt.optim._common import (
    ClipOptimizerBase,
    check_momentum,
    check_nonneg,
    scaled_norm,
    sgd_update,
    state_dtype,
    total_norm,
)

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
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        beta: float = 1.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "skip",
    ) -> None:
        defaults = dict(
            lr=lr,
            beta=beta,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
        )
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _validate_hyper(self, name: str, group: dict[str, Any]) -> None:
        check_nonneg(name, "beta", group["beta"])
        check_momentum(name, group)

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
        scaled: list[tuple[float, list[Tensor]]] = []  # each group's factor (for the statistics)
        for group, (params, grads) in zip(self.param_groups, collected, strict=True):
            if not params:
                continue
            denom = norm_value + float(group["beta"])
            scale = 1.0 / denom if denom > 0 else 0.0
            scaled.append((scale, grads))
            momentum = float(group["momentum"])
            bufs = None
            if momentum != 0:
                bufs = []
                for p in params:
                    st = self.state[p]
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = torch.zeros_like(
                            p, dtype=state_dtype(p), memory_format=torch.preserve_format
                        )
                    bufs.append(st["momentum_buffer"])
            sgd_update(
                params,
                grads,
                bufs,
                lr=float(group["lr"]),
                scale=scale,
                weight_decay=float(group["weight_decay"]),
                momentum=momentum,
                nesterov=bool(group["nesterov"]),
                foreach=self._foreach(group),
            )
        norm = norm.detach()
        post = scaled_norm(norm, scaled)
        factors = {s for s, _ in scaled}

        def build() -> dict[str, Tensor]:  # lazily, on the device, no host sync
            scaled_post = post()[0]
            if len(factors) == 1:
                clip_scale = torch.full((), next(iter(factors)), device=norm.device)
            else:
                clip_scale = scaled_post / norm if norm_value > 0 else torch.zeros((), device=norm.device)
            return {"grad_norm": norm, "post_clip_norm": scaled_post.float(), "clip_scale": clip_scale.float(),
                    "skipped": torch.zeros((), device=norm.device)}

        self._set_stats(build)
        self._steps += 1
        return loss
