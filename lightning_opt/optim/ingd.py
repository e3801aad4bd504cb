"""Stochastic INGD (Interpolated Normalized Gradient Descent) for nonsmooth nonconvex problems."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from lightning_opt.optim._common import (
    ClipOptimizerBase,
    buckets,
    check_beta,
    check_nonneg,
    pick,
    state_dtype,
    total_norm,
    working_copies,
)

__all__ = ["StochasticINGD"]


class StochasticINGD(ClipOptimizerBase):
    r"""Stochastic INGD, thesis ch. 5 Alg. 3 (Stochastic Ingd):

    .. math::
        x_{t+1} &= x_t - \eta_t m_t, \qquad \eta_t = \frac{\mathrm{lr}}{p\lVert m_t\rVert + q} \\
        y_{t+1} &\sim \mathrm{Uniform}[x_t, x_{t+1}]
            \quad (y_{t+1} = x_t + u_t (x_{t+1} - x_t),\ u_t \sim U[0, 1]) \\
        m_{t+1} &= \beta m_t + (1-\beta)\, g(y_{t+1}), \qquad m_1 = g(x_1)

    with :math:`\lVert m_t\rVert` the 2-norm over all parameters of the optimizer and one :math:`u_t` per step
    for all of them (a point on the segment in the full parameter space). ``lr`` multiplies the thesis step
    :math:`1/(p\lVert m\rVert + q)`; the default ``lr=1`` is the thesis algorithm, and it lets LR schedulers
    act.
    Defaults are the thesis' CIFAR-10 settings (§5.6): ``beta=0.9``, ``p=1``, ``q=10``, ``weight_decay=5e-4``.

    **Where the model is.** The gradient is taken at :math:`y`, so the *model parameters hold* :math:`y`
    during training, while the iterate :math:`x` (the point the theory is about) lives in the optimizer state
    (``state[p]["x"]``, float32 for half-precision parameters). At the first ``step()`` the parameters are
    :math:`x_1 = y_1`. Each ``step()`` consumes :math:`g(y_t)` and writes :math:`y_{t+1}` into the parameters.
    Use :meth:`swap_iterate` (context manager) or :meth:`swap_in_iterate` / :meth:`swap_out_iterate` to put
    :math:`x` into the parameters for evaluation or for saving weights, and to restore :math:`y` afterwards
    (bit-exact). While swapped in, ``state[p]["y"]`` holds :math:`y`, so an optimizer ``state_dict`` taken
    then is complete; ``load_state_dict`` of such a state restores :math:`y` into the parameters (load the
    model weights first, as Lightning does). ``step()`` refuses to run while the iterate is swapped in.

    **Output.** Alg. 3 returns :math:`x_{\max\{i-K, 1\}}` for :math:`i` uniform on :math:`\{1, \dots, T\}`
    (lines 8–10), not the last iterate: add the :class:`~lightning_opt.callbacks.RandomIterate` callback
    (``lag=K``) to end a fit on that iterate.

    **Weight decay** is L2 on the objective, evaluated at the oracle point: the gradient used is
    :math:`g(y) + \lambda y` (the exact gradient of :math:`f + \tfrac{\lambda}{2}\lVert\cdot\rVert^2` at
    :math:`y`), as in the thesis' experiments with SGD-style decay.

    **Randomness.** :math:`u_t` comes from the optimizer's own CPU ``torch.Generator`` seeded with ``seed``
    (default: ``torch.initial_seed()``, so that identically seeded data-parallel ranks draw the same
    :math:`u_t` and stay in sync without consuming the global RNG). Its state is in ``state_dict()``, so a
    resumed run draws the same :math:`u_t` as the uninterrupted one.

    Args:
        params: parameters or param groups.
        lr: multiplier of the normalised step, ``>= 0``.
        beta: momentum :math:`\beta \in [0, 1)`.
        p: :math:`p \ge 0`; q: :math:`q \ge 0`; not both zero.
        weight_decay: :math:`\lambda \ge 0`.
        seed: seed of the segment sampler (``int >= 0`` or ``None``).
        maximize, foreach, nonfinite: as in :class:`ClippedSGD` (``nonfinite``: ``"skip"`` or ``"raise"``;
            a skipped step leaves :math:`x`, :math:`m`, the parameters and the sampler untouched).

    Parameters without a gradient in a step are left out of that step (as in ``torch.optim``). A parameter's
    state starts at its first gradient (:math:`m = g`, :math:`x` = current value).

    :attr:`last_stats` (0-d tensors): ``grad_norm`` (raw gradient), ``momentum_norm``
    (:math:`\lVert m_t\rVert`), ``eta`` (:math:`\eta_t` of the first param group), ``u`` (:math:`u_t`, on the
    CPU), ``skipped``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        beta: float = 0.9,
        p: float = 1.0,
        q: float = 10.0,
        weight_decay: float = 5e-4,
        *,
        seed: int | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "skip",
    ) -> None:
        name = type(self).__name__
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0
        ):
            raise ValueError(f"{name}: invalid seed={seed!r}; expected None or an int >= 0")
        defaults = dict(
            lr=lr, beta=beta, p=p, q=q, weight_decay=weight_decay, maximize=maximize, foreach=foreach
        )
        super().__init__(params, defaults, nonfinite=nonfinite)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(int(seed) if seed is not None else torch.initial_seed())
        self._swapped = False

    def _validate_hyper(self, name: str, group: dict[str, Any]) -> None:
        check_beta(name, "beta", group["beta"])
        p = check_nonneg(name, "p", group["p"])
        q = check_nonneg(name, "q", group["q"])
        if p == 0 and q == 0:
            raise ValueError(
                f"{name}: invalid p={group['p']!r}, q={group['q']!r}; accepted range: p >= 0, q >= 0 "
                "and p + q > 0 (the step is lr / (p * ||m|| + q))"
            )

    # -- the iterate x ------------------------------------------------------------------------------------
    @property
    def iterate_swapped_in(self) -> bool:
        """Whether the parameters hold the iterate :math:`x` now (rather than the oracle point :math:`y`)."""
        return self._swapped

    @torch.no_grad()
    def swap_in_iterate(self) -> None:
        """Put the iterate :math:`x` into the parameters; keep :math:`y` in ``state[p]["y"]``."""
        if self._swapped:
            raise RuntimeError("StochasticINGD: the iterate is already swapped in")
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st or "x" not in st:
                    continue  # never stepped: x == y == the parameter
                st["y"] = p.detach().clone()
                p.copy_(st["x"])
        self._swapped = True

    @torch.no_grad()
    def swap_out_iterate(self) -> None:
        """Put :math:`y` back into the parameters (bit-exact) after :meth:`swap_in_iterate`."""
        if not self._swapped:
            raise RuntimeError("StochasticINGD: the iterate is not swapped in")
        self._restore_y()

    def _restore_y(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st and "y" in st:
                    p.copy_(st.pop("y"))
        self._swapped = False

    @contextlib.contextmanager
    def swap_iterate(self) -> Iterator[None]:
        """Context manager: the parameters hold the iterate :math:`x` inside, :math:`y` again on exit."""
        self.swap_in_iterate()
        try:
            yield
        finally:
            self.swap_out_iterate()

    # -- checkpoints --------------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        extra = super()._extra_state()
        extra["generator_state"] = self._generator.get_state()
        return extra

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        if "generator_state" in extra:
            self._generator.set_state(extra["generator_state"].clone())

    def _state_value_dtype(self, p: Tensor, key: str, value: Tensor) -> torch.dtype:
        return p.dtype if key == "y" else super()._state_value_dtype(p, key, value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load optimizer state; if saved with the iterate swapped in, restore :math:`y` into the params."""
        super().load_state_dict(state_dict)
        with torch.no_grad():
            self._restore_y()

    # -- the step -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Consume :math:`g(y_t)` (in ``p.grad``), update :math:`m`, :math:`x`, write :math:`y_{t+1}` into the
        parameters; returns the closure's loss, if any."""
        if self._swapped:
            raise RuntimeError(
                "StochasticINGD.step() called while the iterate is swapped in; "
                "call swap_out_iterate() (or leave the swap_iterate() block) first"
            )
        loss = self._closure_loss(closure)
        collected = [self._collect(group) for group in self.param_groups]
        gnorm = total_norm(
            (grads, self._foreach(group))
            for group, (_, grads) in zip(self.param_groups, collected, strict=True)
        )
        if gnorm is None or self._check_finite(gnorm) is None:
            return loss
        device = gnorm.device

        # 1) momentum m <- beta m + (1 - beta) (g + wd y); m_1 = g_1 + wd y_1 for a fresh parameter
        momenta: list[list[Tensor]] = []
        iterates: list[list[Tensor]] = []
        for group, (params, grads) in zip(self.param_groups, collected, strict=True):
            foreach = self._foreach(group)
            wd, beta = float(group["weight_decay"]), float(group["beta"])
            ms: list[Tensor] = []
            xs: list[Tensor] = []
            old: list[int] = []
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                st = self.state[p]
                if "m" not in st:
                    st["x"] = p.detach().to(state_dtype(p), copy=True)
                    st["m"] = g + wd * st["x"] if wd != 0 else g.clone()
                else:
                    old.append(i)
                ms.append(st["m"])
                xs.append(st["x"])
            if old:
                if foreach:
                    for idx in buckets(pick(params, old)):
                        sel = pick(old, idx)
                        gs = pick(grads, sel)
                        if wd != 0:  # g + wd * y, in the scratch buffer
                            ss = self._scratch(pick(params, sel))
                            torch._foreach_copy_(ss, gs)
                            torch._foreach_add_(ss, working_copies(pick(params, sel)), alpha=wd)
                            gs = ss
                        torch._foreach_lerp_(pick(ms, sel), gs, 1.0 - beta)
                else:
                    for i in old:
                        g = grads[i]
                        if wd != 0:
                            g = g + wd * working_copies([params[i]])[0]
                        ms[i].lerp_(g, 1.0 - beta)
            momenta.append(ms)
            iterates.append(xs)

        # 2) eta_t = lr / (p ||m_t|| + q), on the device (no host sync)
        mnorm = total_norm(
            (ms, self._foreach(group)) for group, ms in zip(self.param_groups, momenta, strict=True)
        )
        assert mnorm is not None
        u = float(torch.rand((), generator=self._generator, dtype=torch.float64))

        # 3) x_{t+1} = x_t - eta m_t ; y_{t+1} = x_t + u (x_{t+1} - x_t) -> parameters
        first_eta: Tensor | None = None
        for group, (params, _), ms, xs in zip(self.param_groups, collected, momenta, iterates, strict=True):
            if not params:
                continue
            denom = float(group["p"]) * mnorm + float(group["q"])
            neg_eta = torch.where(denom > 0, -float(group["lr"]) / denom, torch.zeros_like(denom))
            first_eta = -neg_eta if first_eta is None else first_eta
            if self._foreach(group):
                for idx in buckets(params):
                    ps, mb, xb = pick(params, idx), pick(ms, idx), pick(xs, idx)
                    steps = self._scratch(ps)  # s = -eta m
                    torch._foreach_copy_(steps, mb)
                    torch._foreach_mul_(steps, neg_eta.to(device=mb[0].device, dtype=mb[0].dtype))
                    if ps[0].dtype == xb[0].dtype:
                        torch._foreach_copy_(ps, xb)
                        torch._foreach_add_(ps, steps, alpha=u)
                    else:
                        torch._foreach_copy_(ps, torch._foreach_add(xb, steps, alpha=u))
                    torch._foreach_add_(xb, steps)
            else:
                for p, m, x in zip(params, ms, xs, strict=True):
                    s = m * neg_eta.to(device=m.device, dtype=m.dtype)
                    p.copy_(torch.add(x, s, alpha=u))
                    x.add_(s)

        assert first_eta is not None
        gnorm, mnorm, eta = gnorm.detach(), mnorm.detach(), first_eta.detach()
        self._set_stats(
            lambda: {
                "grad_norm": gnorm,
                "momentum_norm": mnorm,
                "eta": eta.float(),
                "u": torch.tensor(u, dtype=torch.float32),
                "skipped": torch.zeros((), device=device),
            }
        )
        self._steps += 1
        return loss
