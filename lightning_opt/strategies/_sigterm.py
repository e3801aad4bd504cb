"""Lightning's per-batch SIGTERM broadcast, kept only on the steps that communicate anyway.

Why: since mid-2025 (Lightning PR #20825) the training loop broadcasts rank 0's "received SIGTERM" flag at the
start of every batch whenever the world has more than one rank (``_TrainingEpochLoop._broadcast_sigterm_tensor``):
a blocking collective and a host sync per batch (its cost under DDP is Lightning issue #21487). DDP communicates on
every step anyway; a local step of Local SGD, LSGD, EASGD or Lookahead ``mode="local"`` is meant to need no other
rank, and this broadcast made it wait for the slowest rank (and, on a real network, for a round trip) every time.

With this the flag is broadcast at the start of every batch of an optimizer step that syncs or averages gradients
(warm-up, Lookahead ``mode="sync"``, the step that ends a period, and the first step after warm-up, whose period is
not yet known), a decision every rank takes alike from the same step counters, so the collectives still pair up.
A SIGTERM that reaches rank 0 alone still stops every rank: rank 0 after its current step (Lightning's own check),
the others at the start of the next step that communicates, at most one period later than under DDP
(docs/COMPATIBILITY.md; ``tests/test_reliability.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def broadcast_sigterm_only_when(trainer: Any, communicates: Callable[[], bool]) -> Callable[[], None]:
    """Make ``trainer``'s training loop broadcast the SIGTERM flag only when ``communicates()`` is true (it must
    return the same on every rank). Returns the function that undoes it. A Lightning without the per-batch
    broadcast is left as it is."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    broadcast = getattr(loop, "_broadcast_sigterm_tensor", None)
    if broadcast is None:
        return lambda: None

    def maybe_broadcast() -> None:
        if communicates():
            broadcast()

    loop._broadcast_sigterm_tensor = maybe_broadcast

    def undo() -> None:
        if vars(loop).get("_broadcast_sigterm_tensor") is maybe_broadcast:
            del loop._broadcast_sigterm_tensor

    return undo
