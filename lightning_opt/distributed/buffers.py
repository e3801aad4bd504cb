"""Which tensors a synchronisation touches, and when a non-finite value is corruption.

Rules (shared by every periodic strategy, and by the consensus built for evaluation and checkpoints):

* **Parameters** are averaged / pulled and strictly checked: any non-finite value is corruption.
* **Non-persistent buffers** (``register_buffer(..., persistent=False)``: causal masks, rotary caches,
  ``position_ids``) are derived state that every rank computes for itself: never synchronised, never judged.
* **Persistent buffers** are synchronised (floats averaged or pulled, integers taken from rank 0) only where
  they *differ* between ranks, judged by a bit-exact fingerprint per buffer (two integer sums, agreed by one tiny
  all-reduce). Buffers that are identical on every rank (a mask or a position table kept in ``state_dict``, a
  step counter) need no averaging and cost nothing; BatchNorm statistics differ after local steps and are
  averaged as before. (``Tensor._version`` cannot tell: kernels such as batch norm update their running
  statistics without bumping it.)
* A buffer's value is **corruption** when it *became* non-finite: a non-finite entry where the buffer held a
  finite one when it was first seen (after the initial broadcast). A buffer that holds ``-inf`` by design (an
  additive attention mask) is therefore judged on its other entries only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_opt.distributed.buckets import all_finite, is_dist


def persistent_buffers(module: nn.Module) -> list[Tensor]:
    """The module's buffers that go into its ``state_dict`` (each tensor once, in ``named_buffers`` order)."""
    out: list[Tensor] = []
    seen: set[int] = set()
    for sub in module.modules():
        skip = getattr(sub, "_non_persistent_buffers_set", set())
        for name, buf in sub._buffers.items():
            if buf is None or name in skip or id(buf) in seen:
                continue
            seen.add(id(buf))
            out.append(buf)
    return out


def fingerprint(t: Tensor) -> Tensor:
    """Two int64 sums of the bit patterns of ``t`` (plain and position-weighted; wrapping): equal on two ranks
    when, and in practice only when, the tensors are bit-identical."""
    flat = t.detach().reshape(-1)
    if flat.is_floating_point():
        flat = flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}.get(flat.element_size(), torch.int16)
                         if flat.element_size() in (2, 4, 8) else torch.uint8)
    bits = flat.to(torch.int64)
    weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
    return torch.stack([bits.sum(), (bits * weights).sum()])


class BufferRules:
    """Implements the module docstring's rules for one module. Call :meth:`reset` once the ranks hold identical
    weights (after the initial broadcast) and :meth:`to_sync` (a collective) where buffers are synchronised."""

    def __init__(self) -> None:
        self._designed: dict[int, tuple[Tensor, Tensor]] = {}

    def reset(self, module: nn.Module) -> None:
        """Record the buffers' non-finite entries: by design from now on."""
        self._designed = {}
        for buf in persistent_buffers(module):
            if buf.is_floating_point() and not all_finite([buf]):
                self._designed[id(buf)] = (buf, ~torch.isfinite(buf))

    def to_sync(self, module: nn.Module, group: object = None) -> list[Tensor]:
        """Persistent buffers that differ between ranks (every rank gets the same list)."""
        buffers = persistent_buffers(module)
        if not buffers or not is_dist():
            return buffers
        device = buffers[0].device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        prints = torch.stack([fingerprint(b).to(device) for b in buffers])
        both = torch.cat([prints, -prints], dim=1)  # max of x and of -x: equal on all ranks iff max == min
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
        differs = (both[:, :2] != -both[:, 2:]).any(dim=1).tolist()
        return [b for b, d in zip(buffers, differs) if d]

    def corrupt(self, tensors: Sequence[Tensor]) -> bool:
        """Whether any of ``tensors`` holds a non-finite value it was not designed to hold (one host sync)."""
        if not self._designed:  # the common case (and every gradient): no per-tensor lookups
            return not all_finite(tensors)
        plain = [t for t in tensors if not self._is_designed(t)]
        if plain and not all_finite(plain):
            return True
        designed = [t for t in tensors if self._is_designed(t)]
        if not designed:
            return False
        new_bad = [(~torch.isfinite(t) & ~self._designed[id(t)][1]).any() for t in designed]
        return bool(torch.stack(new_bad).any())

    def _is_designed(self, t: Tensor) -> bool:
        entry = self._designed.get(id(t))
        return entry is not None and entry[0] is t and entry[1].shape == t.shape
