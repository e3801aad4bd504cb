"""The rank-local part of checkpoints: gathering every rank's state on save, checking and handing it back on load.

Lightning writes rank 0's weights, optimizer states and callback states; after local steps the ranks differ, so
exact resume needs every rank's own. On save each rank contributes an entry (CPU copies: weights and buffers,
optimizer states, the strategy's per-rank state, callback states), gathered with ``all_gather_object`` into
``checkpoint["lightning_opt"]["ranks"]``; on load each rank takes its own entry (same world size) or, with a
warning, the consensus the file holds. Cost: rank 0 holds world × (model + optimizer state) while writing.
Pure torch (no Lightning).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_opt.distributed import is_dist

#: The key of our entry in a Lightning checkpoint.
CKPT_KEY = "lightning_opt"


def to_cpu(obj: Any, copy: bool = False) -> Any:
    """``obj`` with every tensor detached and on the CPU (``copy``: also a copy when it is there already)."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=copy)
    if isinstance(obj, dict):
        return {k: to_cpu(v, copy) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v, copy) for v in obj)
    return obj


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def declared_state(owner: object, declared: Mapping[str, str]) -> dict[str, Any]:
    """``{checkpoint key: CPU copy of the attribute}`` for a strategy's declared state (``{key: attribute}``)."""
    return {key: to_cpu(getattr(owner, attr), copy=True) for key, attr in declared.items()}


def load_declared_state(owner: object, declared: Mapping[str, str], state: Mapping[str, Any],
                        device: torch.device) -> None:
    """Set the declared attributes that ``state`` holds (moved to ``device``); the others keep their values."""
    for key, attr in declared.items():
        if key in state:
            setattr(owner, attr, to_device(state[key], device))


def named_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    return list(module.named_parameters()) + list(module.named_buffers())


def gather_ranks(module: nn.Module, checkpoint: dict[str, Any], rank_state: dict[str, Any]) -> list[Any]:
    """Every rank's entry (a collective on every rank; each rank gets the whole list)."""
    local = {
        "module": {n: t.detach().to("cpu", copy=True) for n, t in named_tensors(module)},
        "optimizer_states": to_cpu(checkpoint.get("optimizer_states")),
        "strategy_local": to_cpu(rank_state),
        # Lightning saves rank 0's callback states only; per-rank accumulators (e.g. each rank's own loss
        # averages) would otherwise restart from rank 0's values on the other ranks.
        "callbacks": to_cpu(checkpoint.get("callbacks")),
    }
    if not is_dist():
        return [local]
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, local)
    return ranks


@dataclass
class SavedRun:
    """Our entry of the checkpoint being restored. ``strategy`` is ``None`` when the file was written under
    another strategy (its state is dropped; weights and optimizer states are reused)."""

    world_size: int
    strategy: dict[str, Any] | None
    ranks: list[dict[str, Any]]

    def entry_for(self, rank: int, world_size: int, warn: bool = True) -> dict[str, Any] | None:
        """This rank's own entry, or ``None`` (with a warning if ``warn``) when the world size changed."""
        if self.world_size == world_size:
            return self.ranks[rank]
        if warn:
            warnings.warn(
                f"checkpoint was written with world size {self.world_size}, resuming with {world_size}: every rank "
                "restarts from the consensus weights and rank 0's optimizer state", stacklevel=2)
        return None


def saved_run(checkpoint: dict[str, Any], path: Any, param_names: set[str], strategy_name: str,
              strategy_repr: str) -> SavedRun | None:
    """Our checkpoint entry, checked: non-finite parameters anywhere in the file are refused (every rank checks
    every entry, so all ranks refuse together); a file from another strategy, or with no entry, resumes with a
    warning saying what is reused and what starts afresh."""
    saved = checkpoint.get(CKPT_KEY)
    tables = [("the saved weights", checkpoint.get("state_dict") or {})]
    tables += [(f"rank {r}'s weights", e["module"]) for r, e in enumerate((saved or {}).get("ranks") or [])
               if isinstance(e, dict) and isinstance(e.get("module"), dict)]
    for where, table in tables:
        bad = [n for n in sorted(param_names & set(table)) if isinstance(table[n], Tensor)
               and table[n].is_floating_point() and not bool(torch.isfinite(table[n]).all())]
        if bad:
            raise ValueError(f"{path}: non-finite values in {where} ({', '.join(bad[:4])}"
                             f"{', ...' if len(bad) > 4 else ''}); the file is damaged, refusing to resume from it")
    if saved is None:
        warnings.warn(f"{path} has no lightning_opt entry (written by another strategy, e.g. plain DDP): every rank "
                      "starts from the saved weights, and the sync schedule, counters and outer state start afresh",
                      stacklevel=3)
        return None
    run = SavedRun(saved["world_size"], saved["strategy"], saved["ranks"])
    name = saved.get("strategy_name", strategy_name)
    if name != strategy_name:
        extra = (run.strategy or {}).get("extra") or {}
        # state the saving run never used (e.g. Local SGD's streamed state without streaming) is not worth naming
        used = [k for k, v in extra.items() if not (isinstance(v, (dict, list)) and not v)]
        dropped = ", ".join(sorted(used)) or "none"
        warnings.warn(f"{path} was written under {saved.get('strategy_repr', name)}; resuming under {strategy_repr}: "
                      f"its strategy state is dropped (sync counters, schedule, extra state: {dropped}) and the "
                      "schedule starts afresh; every rank's weights and optimizer state are reused", stacklevel=3)
        run.strategy = None
    return run
