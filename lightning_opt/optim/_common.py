"""Shared machinery of the ``lightning_opt`` optimizers (pure torch, no Lightning).

What every optimizer in this package shares:

* **Validation** -- every hyperparameter is checked in the constructor *and* in every param group added
  later; an invalid one raises ``ValueError`` naming the argument, the value and the accepted range.
* **Non-finite policy** (``nonfinite="skip" | "raise"``) -- before anything is written, the global 2-norm
  of the (raw) gradient over all parameters of the optimizer is computed; a NaN/inf norm (a NaN or inf
  gradient entry, or a norm that overflows) means *no* parameter and *no* optimizer state is touched in that
  step. ``"skip"`` counts the step in :attr:`nonfinite_steps` (saved in the ``state_dict``) and warns;
  ``"raise"`` raises :class:`NonFiniteGradientError` (after counting). Reading the finiteness flag is the
  one device->host synchronisation per step (as ``torch.amp.GradScaler`` does); statistics stay on device.
* **Statistics** -- :attr:`last_stats` is a dict of 0-d tensors describing the last step, always with
  ``"grad_norm"`` (global 2-norm of the raw gradient, before clipping / weight decay) and ``"skipped"``
  (1.0 when the step was skipped as non-finite), plus algorithm-specific entries.
* **Precision** -- optimizer state is kept in float32 for float16 / bfloat16 parameters (in the
  parameter's own dtype for float32 / float64); the update is computed in that precision and rounded into
  the parameter once. ``load_state_dict`` keeps that policy (``torch.optim.Optimizer`` would cast state to
  the parameter dtype).
* **Checkpoints** -- ``state_dict()`` carries, besides torch's ``"state"`` / ``"param_groups"``, a
  ``"lightning_opt"`` entry with optimizer-wide counters (steps, skipped steps, RNG state where used).
* **Two code paths** -- ``foreach=True`` (default when ``None``) uses ``torch._foreach_*`` multi-tensor
  kernels, bucketed by (device, dtype); ``foreach=False`` is a plain per-tensor loop kept simple as a
  reference. The foreach paths allocate no per-step temporaries: CClip, ACClip and StochasticINGD keep one
  reusable scratch buffer per parameter (not checkpointed), since fresh large CPU allocations page-fault.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["NonFiniteGradientError", "NONFINITE_POLICIES"]

NONFINITE_POLICIES = ("skip", "raise")
EXTRA_STATE_KEY = "lightning_opt"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class NonFiniteGradientError(FloatingPointError):
    """Raised by an optimizer built with ``nonfinite="raise"`` when the gradient contains NaN / inf.

    The parameters and the optimizer state are left exactly as they were before the failing ``step()``.
    """


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------
def _as_real(owner: str, name: str, value: Any, accepted: str) -> float:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{owner}: invalid {name}={value!r}; expected a real number with {accepted}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}: invalid {name}={value!r}; expected a finite real number with {accepted}")
    return value


def check_nonneg(owner: str, name: str, value: Any) -> float:
    accepted = f"{name} >= 0"
    v = _as_real(owner, name, value, accepted)
    if v < 0:
        raise ValueError(f"{owner}: invalid {name}={value!r}; accepted range: {accepted}")
    return v


def check_positive(owner: str, name: str, value: Any) -> float:
    accepted = f"{name} > 0"
    v = _as_real(owner, name, value, accepted)
    if v <= 0:
        raise ValueError(f"{owner}: invalid {name}={value!r}; accepted range: {accepted}")
    return v


def check_beta(owner: str, name: str, value: Any) -> float:
    """A momentum / averaging coefficient in [0, 1)."""
    accepted = f"0 <= {name} < 1"
    v = _as_real(owner, name, value, accepted)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{owner}: invalid {name}={value!r}; accepted range: {accepted}")
    return v


def check_interval(
    owner: str, name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool
) -> float:
    accepted = f"{name} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    v = _as_real(owner, name, value, accepted)
    ok_low = v > low if low_open else v >= low
    ok_high = v < high if high_open else v <= high
    if not (ok_low and ok_high):
        raise ValueError(f"{owner}: invalid {name}={value!r}; accepted range: {accepted}")
    return v


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ValueError(
            f"{owner}: invalid {name}={value!r}; accepted values: {', '.join(map(repr, choices))}"
        )
    return value


def check_bool(owner: str, name: str, value: Any, *, allow_none: bool = False) -> bool | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        accepted = "True, False or None" if allow_none else "True or False"
        raise ValueError(f"{owner}: invalid {name}={value!r}; accepted values: {accepted}")
    return value


# ----------------------------------------------------------------------------------------------------
# tensor helpers
# ----------------------------------------------------------------------------------------------------
def check_momentum(owner: str, group: dict[str, Any]) -> float:
    """``momentum`` in [0, 1) and ``nesterov`` a bool that needs momentum > 0."""
    momentum = check_beta(owner, "momentum", group["momentum"])
    if check_bool(owner, "nesterov", group["nesterov"]) and momentum == 0:
        raise ValueError(
            f"{owner}: invalid nesterov=True with momentum={group['momentum']!r}; "
            "Nesterov momentum needs momentum in (0, 1)"
        )
    return momentum


def state_dtype(p: Tensor) -> torch.dtype:
    """Dtype of the optimizer state (and of the update arithmetic) for parameter ``p``."""
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype


def buckets(params: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``params`` grouped by (device, dtype), the unit of one multi-tensor kernel call."""
    out: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        out[(p.device, p.dtype)].append(i)
    return list(out.values())


def pick(seq: Sequence[Any], idx: Sequence[int]) -> list[Any]:
    return [seq[i] for i in idx]


def working_copies(params: Sequence[Tensor]) -> list[Tensor]:
    """The parameters in state precision: the tensors themselves, or float32 copies of low-precision ones."""
    return [p if p.dtype not in _LOW_PRECISION else p.detach().float() for p in params]


def write_back(params: Sequence[Tensor], work: Sequence[Tensor], foreach: bool) -> None:
    """Round float32 working copies back into low-precision parameters (no-op for the others)."""
    pairs = [(p, w) for p, w in zip(params, work, strict=True) if p is not w]
    if not pairs:
        return
    if foreach:
        torch._foreach_copy_([p for p, _ in pairs], [w for _, w in pairs])
    else:
        for p, w in pairs:
            p.copy_(w)


def total_norm(tensor_lists: Iterable[tuple[Sequence[Tensor], bool]]) -> Tensor | None:
    """Global 2-norm of all tensors in ``(tensors, foreach)`` pairs, a 0-d tensor on the first tensor's
    device.

    Computed in at least float32 (float64 when any tensor is float64). ``None`` when there is no tensor.
    """
    norms: list[Tensor] = []
    for tensors, foreach in tensor_lists:
        if not tensors:
            continue
        if foreach:
            for idx in buckets(tensors):
                norms.extend(torch._foreach_norm(pick(tensors, idx)))
        else:
            norms.extend(torch.linalg.vector_norm(t) for t in tensors)
    if not norms:
        return None
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device=device, dtype=dtype) for n in norms]))


def sgd_update(
    params: list[Tensor],
    directions: list[Tensor],
    bufs: list[Tensor] | None,
    *,
    lr: float,
    scale: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    foreach: bool,
) -> None:
    """``p <- p - lr * d`` where ``d`` is the SGD (+ heavy-ball / Nesterov momentum) direction built from
    ``scale * directions + weight_decay * p``; ``bufs`` are the momentum buffers (``None`` when momentum
    is 0). ``directions`` (state precision) are only read.

    The per-tensor path spells the formula out; the foreach path reorders it so that no temporary is
    allocated (same values up to rounding):
    ``b <- mu b + s g + wd p``; ``p <- p - lr b`` or, Nesterov, ``p <- p (1 - lr wd) - lr s g - lr mu b``.
    """
    if not foreach:
        for i, (p, g) in enumerate(zip(params, directions, strict=True)):
            w = working_copies([p])[0]
            d = g * scale
            if weight_decay != 0:
                d = d + weight_decay * w
            if momentum != 0:
                assert bufs is not None
                buf = bufs[i]
                buf.mul_(momentum).add_(d)
                d = d + momentum * buf if nesterov else buf
            w.add_(d, alpha=-lr)
            write_back([p], [w], foreach=False)
        return
    for idx in buckets(params):
        ps, gs = pick(params, idx), pick(directions, idx)
        ws = working_copies(ps)
        if momentum == 0:
            if weight_decay != 0:
                torch._foreach_mul_(ws, 1.0 - lr * weight_decay)
            torch._foreach_add_(ws, gs, alpha=-lr * scale)
        else:
            assert bufs is not None
            bs = pick(bufs, idx)
            torch._foreach_mul_(bs, momentum)
            torch._foreach_add_(bs, gs, alpha=scale)
            if weight_decay != 0:
                torch._foreach_add_(bs, ws, alpha=weight_decay)
            if nesterov:
                if weight_decay != 0:
                    torch._foreach_mul_(ws, 1.0 - lr * weight_decay)
                torch._foreach_add_(ws, gs, alpha=-lr * scale)
                torch._foreach_add_(ws, bs, alpha=-lr * momentum)
            else:
                torch._foreach_add_(ws, bs, alpha=-lr)
        write_back(ps, ws, foreach=True)


# ----------------------------------------------------------------------------------------------------
# base class
# ----------------------------------------------------------------------------------------------------
class ClipOptimizerBase(Optimizer):
    """Base of the package's optimizers: validation hooks, non-finite policy, stats, checkpoint extras.

    Subclasses implement :meth:`_validate_hyper` (raise ``ValueError`` on invalid algorithm-specific
    hyperparameters; ``lr``, ``weight_decay``, ``maximize`` and ``foreach`` are checked here) and ``step``;
    they call :meth:`_collect` to get ``(params, grads)`` per group and :meth:`_check_finite` on the global
    gradient norm before writing anything.
    """

    def __init__(self, params: Any, defaults: dict[str, Any], *, nonfinite: str = "skip") -> None:
        name = type(self).__name__
        self.nonfinite: str = check_choice(name, "nonfinite", nonfinite, NONFINITE_POLICIES)
        self._validate_group(defaults)
        self._steps = 0
        self._nonfinite_steps = 0
        self._scratch_bufs: dict[Tensor, Tensor] = {}
        self._stats_build: Callable[[], dict[str, Tensor]] | None = None
        self._stats_cache: dict[str, Tensor] | None = None
        super().__init__(params, defaults)

    # -- hyperparameters -----------------------------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        check_nonneg(name, "lr", group["lr"])
        self._validate_hyper(name, group)
        check_nonneg(name, "weight_decay", group["weight_decay"])
        check_bool(name, "maximize", group["maximize"])
        check_bool(name, "foreach", group["foreach"], allow_none=True)

    def _validate_hyper(self, name: str, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        name = type(self).__name__
        for p in group["params"]:
            if not p.is_floating_point():
                raise ValueError(
                    f"{name}: parameters must be real floating point tensors; got dtype {p.dtype}"
                )
        self._validate_group(group)

    # -- counters ------------------------------------------------------------------------------------------
    @property
    def nonfinite_steps(self) -> int:
        """Number of ``step()`` calls skipped (or raised on) because the gradient was not finite."""
        return self._nonfinite_steps

    @property
    def steps(self) -> int:
        """Number of ``step()`` calls that updated the parameters."""
        return self._steps

    # -- gradients -----------------------------------------------------------------------------------------
    @staticmethod
    def _foreach(group: dict[str, Any]) -> bool:
        return True if group["foreach"] is None else bool(group["foreach"])

    def _collect(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """Parameters of ``group`` that have a gradient, and their gradients in state precision
        (negated when ``maximize``). Gradients are never modified in place afterwards unless copied here."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            g = p.grad
            sd = state_dtype(p)
            params.append(p)
            grads.append(g if g.dtype == sd else g.to(sd))
        if group.get("maximize", False) and grads:
            grads = torch._foreach_neg(grads) if self._foreach(group) else [-g for g in grads]
        return params, grads

    def _scratch(self, params: Sequence[Tensor]) -> list[Tensor]:
        """One reusable work buffer per parameter (state precision; not checkpointed): the foreach paths
        use it instead of allocating temporaries every step (fresh large CPU allocations page-fault)."""
        out = []
        for p in params:
            buf = self._scratch_bufs.get(p)
            if buf is None or buf.shape != p.shape or buf.device != p.device or buf.dtype != state_dtype(p):
                buf = torch.empty_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
                self._scratch_bufs[p] = buf
            out.append(buf)
        return out

    def _check_finite(self, norm: Tensor) -> float | None:
        """Apply the non-finite policy to the global gradient norm: its value as a Python float when finite,
        ``None`` when the step must be skipped. The one host sync of a step."""
        value = float(norm)
        if math.isfinite(value):
            return value
        self._nonfinite_steps += 1
        norm = norm.detach()
        self._set_stats(lambda: {"grad_norm": norm, "skipped": torch.ones((), device=norm.device)})
        msg = (
            f"{type(self).__name__}: non-finite gradient (global norm {value}) at step "
            f"{self._steps + self._nonfinite_steps}; parameters and optimizer state left unchanged"
        )
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(msg + " (nonfinite='raise')")
        warnings.warn(
            msg + f"; step skipped ({self._nonfinite_steps} skipped so far)", RuntimeWarning, stacklevel=3
        )
        return None

    # -- statistics ----------------------------------------------------------------------------------------
    def _set_stats(self, build: Callable[[], dict[str, Tensor]]) -> None:
        """Record how to build :attr:`last_stats`; the small tensor ops run only when somebody reads them."""
        self._stats_build = build
        self._stats_cache = None

    @property
    def last_stats(self) -> dict[str, Tensor]:
        """Statistics of the last ``step()`` as 0-d tensors (computed on first access, without a host sync;
        empty before the first step). Always ``grad_norm`` (global 2-norm of the raw gradient) and
        ``skipped``; the other keys are listed in each optimizer's docstring."""
        if self._stats_cache is None:
            self._stats_cache = self._stats_build() if self._stats_build is not None else {}
        return self._stats_cache

    @staticmethod
    def _closure_loss(closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {"steps": self._steps, "nonfinite_steps": self._nonfinite_steps}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._steps = int(extra.get("steps", 0))
        self._nonfinite_steps = int(extra.get("nonfinite_steps", 0))

    def _state_value_dtype(self, p: Tensor, key: str, value: Tensor) -> torch.dtype:
        return state_dtype(p) if value.is_floating_point() else value.dtype

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd[EXTRA_STATE_KEY] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        extra = sd.pop(EXTRA_STATE_KEY, None)
        super().load_state_dict(sd)
        # torch casts floating state to the parameter dtype: redo the cast with our precision policy, and copy
        # so that the loaded state never aliases the caller's dict.
        id_map: dict[Any, Tensor] = {}
        for saved, group in zip(sd["param_groups"], self.param_groups, strict=True):
            id_map.update(zip(saved["params"], group["params"], strict=True))
        for key, values in sd["state"].items():
            if key not in id_map:
                continue
            p = id_map[key]
            self.state[p] = {
                k: (
                    v.detach().to(device=p.device, dtype=self._state_value_dtype(p, k, v), copy=True)
                    if isinstance(v, Tensor)
                    else v
                )
                for k, v in values.items()
            }
        if extra is not None:
            self._load_extra_state(extra)


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
