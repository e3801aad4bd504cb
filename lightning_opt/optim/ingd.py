"""Stochastic INGD (Interpolated Normalized Gradient Descent) for nonsmooth nonconvex problems."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from lightning_opt._tensors import accumulation_dtype
from lightning_opt._validation import check_float, check_int
from lightning_opt.optim._base import ClipOptimizerBase, GroupGrads, Stats
from lightning_opt.optim._tensor_lists import as_state_precision, by_device_and_dtype, scratch_or_new, total_norm

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
        self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1.0, beta: float = 0.9, p: float = 1.0,
        q: float = 10.0, weight_decay: float = 5e-4, *, seed: int | None = None, maximize: bool = False,
        foreach: bool | None = None, nonfinite: str = "skip",
    ) -> None:
        if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
            seed = int(seed)  # numpy integers too
        check_int("seed", seed, 0, owner=type(self).__name__, optional=True)
        defaults = dict(lr=lr, beta=beta, p=p, q=q, weight_decay=weight_decay, maximize=maximize, foreach=foreach)
        super().__init__(params, defaults, nonfinite=nonfinite)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(int(seed) if seed is not None else torch.initial_seed())
        self._swapped = False

    def _validate_hyper(self, owner: str, group: dict[str, Any]) -> None:
        check_float("beta", group["beta"], 0.0, 1.0, high_open=True, owner=owner)
        p = check_float("p", group["p"], 0.0, owner=owner)
        q = check_float("q", group["q"], 0.0, owner=owner)
        if p == 0 and q == 0:
            raise ValueError(f"{owner}: invalid p={group['p']!r}, q={group['q']!r}; expected p + q > 0 (the step "
                             "is lr / (p * ||m|| + q))")

    # -- the iterate x ------------------------------------------------------------------------------------
    @property
    def iterate_swapped_in(self) -> bool:
        """Whether the parameters hold the iterate :math:`x` now (rather than the oracle point :math:`y`)."""
        return self._swapped

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
                with torch.no_grad():  # contexts, not decorators: mutmut skips decorated functions
                    p.copy_(st["x"])
        self._swapped = True

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
                    with torch.no_grad():
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
    def _check_ready(self) -> None:
        if self._swapped:
            raise RuntimeError(
                "StochasticINGD.step() called while the iterate is swapped in; "
                "call swap_out_iterate() (or leave the swap_iterate() block) first"
            )

    def _update(self, batches: list[GroupGrads], norm: Tensor, norm_value: float) -> Stats:
        """Consume :math:`g(y_t)` (in ``p.grad``), update :math:`m`, :math:`x`, write :math:`y_{t+1}` into the
        parameters."""
        # 1) m <- beta m + (1 - beta) (g + wd y)
        states = [self._momenta(b) for b in batches]
        # 2) eta_t = lr / (p ||m_t|| + q), ||m_t|| over all groups, on the device (no host sync)
        mnorm = total_norm((ms, b.foreach) for b, (ms, _) in zip(batches, states, strict=True))
        assert mnorm is not None
        u = float(torch.rand((), generator=self._generator, dtype=torch.float64))
        # 3) x_{t+1} = x_t - eta m_t ; y_{t+1} = x_t + u (x_{t+1} - x_t) -> parameters
        etas: list[Tensor] = []
        for b, (ms, xs) in zip(batches, states, strict=True):
            denom = float(b.group["p"]) * mnorm + float(b.group["q"])
            neg_eta = torch.where(denom > 0, -float(b.group["lr"]) / denom, torch.zeros_like(denom))
            etas.append(-neg_eta)
            ingd_move(b.params, xs, ms, self._scratch(b.params) if b.foreach else None, neg_eta=neg_eta, u=u,
                      foreach=b.foreach)
        mnorm, eta = mnorm.detach(), etas[0].detach()
        return lambda: {"momentum_norm": mnorm, "eta": eta.float(), "u": torch.tensor(u, dtype=torch.float32)}

    def _momenta(self, batch: GroupGrads) -> tuple[list[Tensor], list[Tensor]]:
        """Alg. 3's momentum update for ``batch``; a parameter's state starts at its first gradient
        (m = g + λy, x = y). Returns the momenta and the iterates."""
        wd, beta = float(batch.group["weight_decay"]), float(batch.group["beta"])
        ms: list[Tensor] = []
        xs: list[Tensor] = []
        old: list[int] = []
        for i, (p, g) in enumerate(zip(batch.params, batch.grads, strict=True)):
            st = self.state[p]
            if "m" not in st:
                st["x"] = p.detach().to(accumulation_dtype(p.dtype), copy=True)
                st["m"] = g + wd * st["x"] if wd != 0 else g.clone()
            else:
                old.append(i)
            ms.append(st["m"])
            xs.append(st["x"])
        if old:
            ys = [batch.params[i] for i in old]
            ingd_momentum(ys, [batch.grads[i] for i in old], [ms[i] for i in old],
                          self._scratch(ys) if batch.foreach else None, beta=beta, weight_decay=wd,
                          foreach=batch.foreach)
        return ms, xs


def ingd_momentum(params: list[Tensor], grads: list[Tensor], momenta: list[Tensor], scratch: list[Tensor] | None, *,
                  beta: float, weight_decay: float, foreach: bool) -> None:
    """Alg. 3 line 6 with L2 decay at the oracle point: m ← βm + (1 − β)(g(y) + λy); ``params`` hold y.
    ``scratch`` (foreach path, with decay) holds g + λy."""
    if foreach:
        _ingd_momentum_foreach(params, grads, momenta, scratch_or_new(scratch, grads), beta=beta,
                               weight_decay=weight_decay)
    else:
        _ingd_momentum_single(params, grads, momenta, beta=beta, weight_decay=weight_decay)


def _ingd_momentum_single(params: list[Tensor], grads: list[Tensor], momenta: list[Tensor], *, beta: float,
                          weight_decay: float) -> None:
    for y, g, m in zip(params, grads, momenta, strict=True):
        if weight_decay != 0:
            g = g + weight_decay * as_state_precision([y])[0]
        m.lerp_(g, 1.0 - beta)


def _ingd_momentum_foreach(params: list[Tensor], grads: list[Tensor], momenta: list[Tensor], scratch: list[Tensor],
                           *, beta: float, weight_decay: float) -> None:
    for ys, gs, ms, ss in by_device_and_dtype(params, grads, momenta, scratch):
        if weight_decay != 0:
            torch._foreach_copy_(ss, gs)
            torch._foreach_add_(ss, as_state_precision(ys), alpha=weight_decay)
            gs = ss
        torch._foreach_lerp_(ms, gs, 1.0 - beta)


def ingd_move(params: list[Tensor], iterates: list[Tensor], momenta: list[Tensor], scratch: list[Tensor] | None, *,
              neg_eta: Tensor, u: float, foreach: bool) -> None:
    """Alg. 3 lines 4-5: x ← x + s with s = −ηm, and y = x + u·s (a uniform point of the segment from the old x to
    the new one) into the parameters; ``neg_eta`` = −η stays on the device. ``scratch`` (foreach path) holds s."""
    if foreach:
        _ingd_move_foreach(params, iterates, momenta, scratch_or_new(scratch, momenta), neg_eta=neg_eta, u=u)
    else:
        _ingd_move_single(params, iterates, momenta, neg_eta=neg_eta, u=u)


def _ingd_move_single(params: list[Tensor], iterates: list[Tensor], momenta: list[Tensor], *, neg_eta: Tensor,
                      u: float) -> None:
    for p, x, m in zip(params, iterates, momenta, strict=True):
        s = m * neg_eta.to(device=m.device, dtype=m.dtype)
        p.copy_(torch.add(x, s, alpha=u))
        x.add_(s)


def _ingd_move_foreach(params: list[Tensor], iterates: list[Tensor], momenta: list[Tensor], scratch: list[Tensor],
                       *, neg_eta: Tensor, u: float) -> None:
    for ps, xs, ms, steps in by_device_and_dtype(params, iterates, momenta, scratch):
        torch._foreach_copy_(steps, ms)
        torch._foreach_mul_(steps, neg_eta.to(device=ms[0].device, dtype=ms[0].dtype))
        if ps[0].dtype == xs[0].dtype:
            torch._foreach_copy_(ps, xs)
            torch._foreach_add_(ps, steps, alpha=u)
        else:  # half-precision y: rounded once from x + u s
            torch._foreach_copy_(ps, torch._foreach_add(xs, steps, alpha=u))
        torch._foreach_add_(xs, steps)
