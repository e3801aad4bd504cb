"""Every rank owns its state: tensors that arrive through pickling are detached from shared memory.

Under ``start_method="spawn"`` (and ``forkserver``) Lightning pickles the strategy and the callbacks into every
rank, and ``torch.multiprocessing`` moves CPU tensors into *shared memory* on the way: a tensor created in
``__init__`` and written in place later would be one buffer for all ranks (found: LSGD's score window, where
every rank then reported the same leader score). :class:`RankLocal` is the structural rule: the package's
strategies, callbacks and period schedules inherit it, and unpickling one clones every shared CPU tensor it holds
(in containers and in the package's own nested objects) into memory of its own process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

_OWN_MODULES = ("lightning_opt.",)


def own(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """``obj`` with every shared-memory CPU tensor replaced by a private copy (containers rebuilt, the package's
    own objects updated in place); anything else is returned as is."""
    memo = {} if memo is None else memo
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, Tensor):
        out: Any = obj.clone() if obj.device.type == "cpu" and obj.is_shared() else obj
        memo[key] = out
        return out
    if isinstance(obj, dict):
        memo[key] = obj
        for k, v in list(obj.items()):
            obj[k] = own(v, memo)
        return obj
    if isinstance(obj, list):
        memo[key] = obj
        obj[:] = [own(v, memo) for v in obj]
        return obj
    if isinstance(obj, tuple):
        out = type(obj)(*(own(v, memo) for v in obj)) if hasattr(obj, "_fields") else tuple(own(v, memo)
                                                                                         for v in obj)
        memo[key] = out
        return out
    if _is_own_object(obj):
        memo[key] = obj
        for k, v in list(vars(obj).items()):
            mine = own(v, memo)
            if mine is not v:
                obj.__dict__[k] = mine
    return obj


def _is_own_object(obj: Any) -> bool:
    # Modules are the user's model (their weights are broadcast at setup anyway): never rewritten here.
    return (type(obj).__module__.startswith(_OWN_MODULES) and hasattr(obj, "__dict__")
            and not isinstance(obj, (type, Module)))


class _GeneratorState:
    """A ``torch.Generator`` in transit: its state travels as bytes (``torch.multiprocessing`` cannot rebuild the
    shared-memory copy of a generator's state tensor in a spawned process)."""

    def __init__(self, gen: torch.Generator) -> None:
        self.device = str(gen.device)
        self.state = bytes(gen.get_state().numpy().tobytes())

    def rebuild(self) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.set_state(torch.frombuffer(bytearray(self.state), dtype=torch.uint8))
        return gen


class RankLocal:
    """Mixin for objects that Lightning may pickle into the ranks: after unpickling, no tensor they hold is
    shared with another process, and their ``torch.Generator`` attributes travel as plain bytes (see the module
    docstring)."""

    def __getstate__(self) -> dict[str, Any]:
        parent = getattr(super(), "__getstate__", None)
        state = dict(parent() if parent is not None else self.__dict__)
        return {k: _GeneratorState(v) if isinstance(v, torch.Generator) else v for k, v in state.items()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = {k: v.rebuild() if isinstance(v, _GeneratorState) else v for k, v in own(state).items()}
        parent = getattr(super(), "__setstate__", None)
        if parent is not None:
            parent(state)
        else:
            self.__dict__.update(state)
