"""What the strategies' communication costs: the counters they report as ``comm/*``. Never imports Lightning."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class CommMeter:
    """Cumulative figures of one rank; every field is reported as ``comm/<field>``.

    ``bytes``: payload of the strategy's training collectives (every bucket, flag vector and score gather);
    ``syncs``: synchronisations; ``sync_seconds``: wall-clock time spent in them; ``ddp_bytes``: the gradient
    bytes DDP would have all-reduced for the same optimizer steps (the baseline ``bytes`` compares with);
    ``eval_bytes``: bytes moved to build consensus weights for evaluation and checkpoints (:meth:`as_eval`);
    ``peak_bytes_per_sync``: the most ``bytes`` one sync moved (a streamed sync moves one fragment);
    ``overlap_wait_seconds``: time blocked waiting for an outer gradient sent ahead (streamed syncs).
    """

    bytes: int = 0
    syncs: int = 0
    sync_seconds: float = 0.0
    ddp_bytes: int = 0
    eval_bytes: int = 0
    peak_bytes_per_sync: int = 0
    overlap_wait_seconds: float = 0.0

    def add(self, nbytes: int) -> None:
        """Count the payload of one collective."""
        self.bytes += int(nbytes)

    @contextmanager
    def sync(self) -> Iterator[None]:
        """Count the block as one sync: its time, and its bytes towards the peak."""
        start, before = time.perf_counter(), self.bytes
        yield  # a sync that raises is not counted
        self.syncs += 1
        self.sync_seconds += time.perf_counter() - start
        self.peak_bytes_per_sync = max(self.peak_bytes_per_sync, self.bytes - before)

    @contextmanager
    def as_eval(self) -> Iterator[None]:
        """Book the bytes counted inside the block under ``eval_bytes``: consensus weights for evaluation are not
        training communication, so ``bytes`` stays comparable with DDP's gradient traffic."""
        before = self.bytes
        try:
            yield
        finally:
            self.eval_bytes += self.bytes - before
            self.bytes = before

    def metrics(self) -> dict[str, float]:
        return {f"comm/{f.name}": float(getattr(self, f.name)) for f in fields(self)}

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Checkpoints written before the counters were fields kept three of them in an "extra" dict (and two
        # unreported ones, "calls" and "seconds", which are ignored); a missing counter starts at zero.
        saved = {**state.get("extra", {}), **state}
        for f in fields(self):
            setattr(self, f.name, type(f.default)(saved.get(f.name, f.default)))
