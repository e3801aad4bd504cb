"""The base class of the ``lightning_opt`` optimizers (pure torch, no Lightning): what every one of them shares.

* **Validation** -- every hyperparameter is checked in the constructor *and* in every param group added
  later, with :mod:`lightning_opt._validation` (``ValueError("<Class>: invalid <name>=<value>; expected ...")``).
* **One step, two halves** -- :meth:`ClipOptimizerBase.step` gathers each group's gradients, applies the
  non-finite policy and counts the step; a subclass's ``_update`` gathers its state and calls its algorithm's
  functional core (``torch.optim``'s shape: a foreach core and a per-tensor reference core per algorithm).
* **Non-finite policy** (``nonfinite="skip" | "raise"``) -- before anything is written, the global 2-norm
  of the (raw) gradient over all parameters of the optimizer is computed; a NaN/inf norm (a NaN or inf
  gradient entry, or a norm that overflows) means *no* parameter and *no* optimizer state is touched in that
  step. ``"skip"`` counts the step in :attr:`nonfinite_steps` (saved in the ``state_dict``) and warns;
  ``"raise"`` raises :class:`NonFiniteGradientError` (after counting). Reading the finiteness flag is the
  one device->host synchronisation per step (as ``torch.amp.GradScaler`` does); statistics stay on device.
* **Statistics** -- :attr:`last_stats` is a dict of 0-d tensors describing the last step, always with
  ``"grad_norm"`` (global 2-norm of the raw gradient, before clipping / weight decay) and ``"skipped"``
  (1.0 when the step was skipped as non-finite), plus algorithm-specific entries.
* **Precision** -- optimizer state is kept in ``accumulation_dtype`` (float32 for float16 / bfloat16
  parameters, the parameter's own dtype otherwise); the update is computed in that precision and rounded into
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
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt._tensors import accumulation_dtype
from lightning_opt._validation import check_bool, check_choice, check_float
from lightning_opt.optim._tensor_lists import total_norm

__all__ = ["NONFINITE_POLICIES", "ClipOptimizerBase", "GroupGrads", "NonFiniteGradientError", "Stats", "zeros_state"]

NONFINITE_POLICIES = ("skip", "raise")
EXTRA_STATE_KEY = "lightning_opt"

Stats = Callable[[], dict[str, Tensor]]


class NonFiniteGradientError(FloatingPointError):
    """Raised by an optimizer built with ``nonfinite="raise"`` when the gradient contains NaN / inf.

    The parameters and the optimizer state are left exactly as they were before the failing ``step()``.
    """


@dataclass
class GroupGrads:
    """One param group's share of a step: the parameters that have a gradient, their gradients in state
    precision (negated when ``maximize``) and the group's code path."""

    group: dict[str, Any]
    params: list[Tensor]
    grads: list[Tensor]
    foreach: bool


def zeros_state(state: dict[Any, dict[str, Any]], params: Sequence[Tensor], *keys: str) -> list[list[Tensor]]:
    """Per key, the state tensor of every parameter, created as zeros in state precision at its first step."""
    out: list[list[Tensor]] = [[] for _ in keys]
    for p in params:
        st = state[p]
        for key, tensors in zip(keys, out, strict=True):
            if key not in st:
                st[key] = torch.zeros_like(p, dtype=accumulation_dtype(p.dtype), memory_format=torch.preserve_format)
            tensors.append(st[key])
    return out


class ClipOptimizerBase(Optimizer):
    """Base of the package's optimizers: validation hooks, the step's shared half, non-finite policy, stats,
    checkpoint extras.

    Subclasses implement :meth:`_validate_hyper` (raise ``ValueError`` on invalid algorithm-specific
    hyperparameters; ``lr``, ``weight_decay``, ``maximize`` and ``foreach`` are checked here) and :meth:`_update`
    (the algorithm, on gradients known to be finite).
    """

    def __init__(self, params: Any, defaults: dict[str, Any], *, nonfinite: str) -> None:
        self.nonfinite: str = check_choice("nonfinite", nonfinite, NONFINITE_POLICIES, owner=type(self).__name__)
        self._validate_group(defaults)
        self._steps = 0
        self._nonfinite_steps = 0
        self._scratch_bufs: dict[Tensor, Tensor] = {}
        self._stats_build: Stats | None = None
        self._stats_cache: dict[str, Tensor] | None = None
        super().__init__(params, defaults)

    # -- hyperparameters -----------------------------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any]) -> None:
        owner = type(self).__name__
        check_float("lr", group["lr"], 0.0, owner=owner)
        self._validate_hyper(owner, group)
        check_float("weight_decay", group["weight_decay"], 0.0, owner=owner)
        check_bool("maximize", group["maximize"], owner=owner)
        check_bool("foreach", group["foreach"], owner=owner, optional=True)

    def _validate_hyper(self, owner: str, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if not p.is_floating_point():
                raise ValueError(f"{type(self).__name__}: invalid params of dtype {p.dtype}; expected real floating "
                                 "point tensors")
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

    # -- the step ------------------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimisation step (see the class docstring); returns the closure's loss, if any."""
        with torch.no_grad():  # not @torch.no_grad(): mutmut skips decorated functions (docs/TESTING.md)
            return self._step(closure)

    def _step(self, closure: Callable[[], Any] | None) -> Any:
        self._check_ready()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches = [b for b in map(self._collect, self.param_groups) if b.params]
        norm = total_norm((b.grads, b.foreach) for b in batches)
        if norm is None or self._check_finite(norm) is None:  # the step's one host sync
            return loss
        norm = norm.detach()
        entries = self._update(batches, norm, float(norm))
        self._set_stats(lambda: {"grad_norm": norm, **entries(), "skipped": torch.zeros((), device=norm.device)})
        self._steps += 1
        return loss

    def _check_ready(self) -> None:
        """Raise when the optimizer cannot step now (before the closure runs); a hook, nothing by default."""

    def _update(self, batches: list[GroupGrads], norm: Tensor, norm_value: float) -> Stats:  # pragma: no cover
        """Update the parameters and state of ``batches`` (gradient global 2-norm ``norm``, finite); return a
        builder of the algorithm's :attr:`last_stats` entries (called lazily, so device ops only)."""
        raise NotImplementedError

    def _collect(self, group: dict[str, Any]) -> GroupGrads:
        """The parameters of ``group`` that have a gradient, and their gradients in state precision (negated when
        ``maximize``). Gradients are never modified in place afterwards unless copied here."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            dtype = accumulation_dtype(p.dtype)
            params.append(p)
            grads.append(p.grad if p.grad.dtype == dtype else p.grad.to(dtype))
        foreach = True if group["foreach"] is None else bool(group["foreach"])
        if group.get("maximize", False) and grads:
            grads = torch._foreach_neg(grads) if foreach else [-g for g in grads]
        return GroupGrads(group, params, grads, foreach)

    def _scratch(self, params: Sequence[Tensor]) -> list[Tensor]:
        """One reusable work buffer per parameter (state precision; not checkpointed): the foreach paths
        use it instead of allocating temporaries every step (fresh large CPU allocations page-fault)."""
        out = []
        for p in params:
            dtype = accumulation_dtype(p.dtype)
            buf = self._scratch_bufs.get(p)
            if buf is None or buf.shape != p.shape or buf.device != p.device or buf.dtype != dtype:
                buf = torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format)
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
        # stacklevel: step()'s caller, past the torch.no_grad and Optimizer step-hook wrappers
        warnings.warn(msg + f"; step skipped ({self._nonfinite_steps} skipped so far)", RuntimeWarning, stacklevel=5)
        return None

    # -- statistics ----------------------------------------------------------------------------------------
    def _set_stats(self, build: Stats) -> None:
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

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {"steps": self._steps, "nonfinite_steps": self._nonfinite_steps}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._steps = int(extra.get("steps", 0))
        self._nonfinite_steps = int(extra.get("nonfinite_steps", 0))

    def _state_value_dtype(self, p: Tensor, key: str, value: Tensor) -> torch.dtype:
        return accumulation_dtype(p.dtype) if value.is_floating_point() else value.dtype

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
