"""Which tensors a synchronisation touches, and when a non-finite value is corruption.

Rules (shared by every periodic strategy, and by the consensus built for evaluation and checkpoints):

* **Parameters** are averaged / pulled and strictly checked: any non-finite value is corruption.
* **Non-persistent buffers** (``register_buffer(..., persistent=False)``: causal masks, rotary caches,
  ``position_ids``) are derived state that every rank computes for itself: never synchronised, never judged.
* **Persistent buffers** are synchronised (floats averaged or pulled, integers taken from rank 0) only when some
  rank *wrote* them since the last synchronisation (``Tensor._version``, agreed by one tiny all-reduce). Buffers
  nobody writes (a mask or a position table kept in ``state_dict``) are identical on every rank already and cost
  nothing; BatchNorm statistics are written every training step and so are averaged as before.
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


class BufferRules:
    """Implements the module docstring's rules for one module. Call :meth:`reset` once the ranks hold identical
    weights (after the initial broadcast), :meth:`to_sync` at a synchronisation (a collective) and :meth:`mark`
    after writing the synchronised values."""

    def __init__(self) -> None:
        self._versions: dict[int, tuple[Tensor, int]] = {}
        self._designed: dict[int, tuple[Tensor, Tensor]] = {}

    def reset(self, module: nn.Module) -> None:
        """Record the buffers' non-finite entries (by design, from now on) and their versions."""
        self._designed = {}
        for buf in persistent_buffers(module):
            if buf.is_floating_point() and not all_finite([buf]):
                self._designed[id(buf)] = (buf, ~torch.isfinite(buf))
        self.mark(persistent_buffers(module))

    def mark(self, buffers: Sequence[Tensor]) -> None:
        """The buffers' current values are synchronised (identical on every rank)."""
        for buf in buffers:
            self._versions[id(buf)] = (buf, buf._version)

    def _written(self, buf: Tensor) -> bool:
        seen = self._versions.get(id(buf))
        return seen is None or seen[0] is not buf or seen[1] != buf._version

    def to_sync(self, module: nn.Module, group: object = None) -> list[Tensor]:
        """Persistent buffers that some rank wrote since they were last marked (every rank gets the same list:
        one all-reduce of a flag per buffer)."""
        buffers = persistent_buffers(module)
        if not buffers:
            return []
        written = torch.tensor([float(self._written(b)) for b in buffers])
        if is_dist():
            device = buffers[0].device if dist.get_backend(group) == "nccl" else torch.device("cpu")
            written = written.to(device)
            dist.all_reduce(written, op=dist.ReduceOp.MAX, group=group)
        return [b for b, w in zip(buffers, written.tolist()) if w > 0]

    def corrupt(self, tensors: Sequence[Tensor]) -> bool:
        """Whether any of ``tensors`` holds a non-finite value it was not designed to hold (one host sync)."""
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
