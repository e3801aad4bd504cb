"""Several ranks in one process: one thread per rank on torch's threaded process group, each running a real
Lightning ``Trainer.fit`` with the real strategy.

Why: a rule that needs two workers (averaging over the healthy ranks, LSGD's leader election and group pulls,
EASGD with N > 1) can then be checked by value in process, in about a second, which is what makes mutation
testing of those rules possible (``make mutate`` runs in-process tests only). The collectives are torch's
in-process implementation (``torch.testing._internal.distributed.multi_threaded_pg``), not gloo: the gloo and
launcher behaviour stays covered by the multi-process tests (tests/dist.py).

Rules for code run here: build models before the threads start (their seeding uses torch's global RNG, which
the threads share) and do not draw random numbers during ``fit``.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from scripts._common import pl
from scripts._common import trainer as scripts_trainer
from torch.testing._internal.distributed.multi_threaded_pg import (
    ProcessLocalGroup,
    _install_threaded_pg,
    _uninstall_threaded_pg,
)

ClusterEnvironment = pl.plugins.ClusterEnvironment


class ThreadRank(ClusterEnvironment):
    """This thread's rank in a world of ``world`` threads; the threads exist already, so nothing is launched."""

    def __init__(self, rank: int, world: int) -> None:
        super().__init__()
        self._rank, self._world = rank, world

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return "127.0.0.1"

    @property
    def main_port(self) -> int:
        return 0

    @staticmethod
    def detect() -> bool:
        return False

    def world_size(self) -> int:
        return self._world

    def set_world_size(self, size: int) -> None:
        pass

    def global_rank(self) -> int:
        return self._rank

    def set_global_rank(self, rank: int) -> None:
        pass

    def local_rank(self) -> int:
        return self._rank

    def node_rank(self) -> int:
        return 0


def run_threaded(world: int, fn: Callable[[int], Any], timeout: float = 20.0, grace: float = 3.0) -> list[Any]:
    """``fn(rank)`` on ``world`` threads joined in a threaded process group; returns each rank's result, or
    re-raises the first failing rank's exception (as ``RankError`` naming the rank, with the original as its
    cause; ``.errors`` has every rank's). When a rank fails, the others get ``grace`` seconds to finish or fail
    on their own (so "every rank raises" can be checked), then are woken out of their collectives, so a failure
    never hangs the test; neither do ranks stuck past ``timeout`` seconds (a fit here takes about a second):
    they are woken the same way and the call raises ``TimeoutError``."""
    with _one_dataloader_request_at_a_time():
        return _run(world, fn, timeout, grace)


def _run(world: int, fn: Callable[[int], Any], timeout: float, grace: float) -> list[Any]:
    from lightning_utilities.core.rank_zero import rank_zero_only  # the one object both Lightning packages use

    # each rank's Trainer sets the process-wide rank_zero_only.rank; left at 1, it would silence every later
    # rank-zero logger and warning in this pytest process (a later test's TensorBoardLogger wrote nothing)
    rank_before = getattr(rank_zero_only, "rank", 0)
    _install_threaded_pg()
    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    store, results, errors = dist.HashStore(), [None] * world, [None] * world

    def body(rank: int) -> None:
        dist.init_process_group("threaded", rank=rank, world_size=world, store=store)
        try:
            results[rank] = fn(rank)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors[rank] = exc
        finally:
            dist.destroy_process_group()

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world)]
    try:
        for t in threads:
            t.start()
        _join(threads, errors, time.monotonic() + timeout, grace)
    finally:
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
        _uninstall_threaded_pg()
        ProcessLocalGroup.reset()
        rank_zero_only.rank = rank_before
    for rank, exc in enumerate(errors):
        if exc is not None:
            raise RankError(rank, errors) from exc
    return results


_REQUEST_LOCK = threading.Lock()
_LOOPS = ("fit_loop", "evaluation_loop", "prediction_loop")


@contextlib.contextmanager
def _one_dataloader_request_at_a_time() -> Iterator[None]:
    """Lightning builds a dataloader inside a context that patches ``DataLoader`` and ``BatchSampler`` class-wide
    and restores them on exit; two threads interleaving those enters and exits leave the classes broken
    ("BatchSampler has no attribute '__old__setattr__'"). The loops import ``_request_dataloader`` by name, so each
    loop module's reference is wrapped in one lock while the threads run."""
    modules = [importlib.import_module(f"{pl.__name__}.loops.{name}") for name in _LOOPS]
    originals = [m._request_dataloader for m in modules]

    def locked(request):
        def call(source):
            with _REQUEST_LOCK:
                return request(source)
        return call

    for module, request in zip(modules, originals):
        module._request_dataloader = locked(request)
    try:
        yield
    finally:
        for module, request in zip(modules, originals):
            module._request_dataloader = request


def _join(threads: list[threading.Thread], errors: list[BaseException | None], deadline: float,
          grace: float) -> None:
    failed_at = None
    while any(t.is_alive() for t in threads):
        if time.monotonic() > deadline:
            stuck = TimeoutError("threaded ranks still running at the timeout (a rank waits in a collective "
                                 "the others never joined?)")
            ProcessLocalGroup.exception_handle(stuck)
            for t in threads:
                t.join(2.0)
            raise stuck
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            failed_at = failed_at or time.monotonic()
            if time.monotonic() > failed_at + grace:
                ProcessLocalGroup.exception_handle(first)  # wakes ranks blocked in a collective
        for t in threads:
            t.join(0.05)


class RankError(Exception):
    """A threaded rank raised; ``errors[r]`` is rank r's exception (or ``None``)."""

    def __init__(self, rank: int, errors: list[BaseException | None]) -> None:
        super().__init__(f"rank {rank} raised {errors[rank]!r}")
        self.errors = errors


def trainer(world: int, rank: int, strategy: Any, steps: int, callbacks: list[Any], env: type = None,
            **kw: Any) -> Any:
    """A Trainer for rank ``rank`` of a threaded run of ``strategy`` (the test scripts' Trainer settings, ``kw``
    overriding them; ``env``: the cluster environment class, default :class:`ThreadRank`)."""
    strategy.cluster_environment = (env or ThreadRank)(rank, world)
    kw.setdefault("devices", world)
    return scripts_trainer(strategy, max_steps=steps, callbacks=callbacks, **kw)
