"""A local step issues no collective at all: not ours, and not Lightning's per-batch SIGTERM broadcast either
(strategies/_sigterm.py), which made every local step wait for the slowest rank. Counted in process (one thread
per rank, tests/threaded.py) by wrapping every ``torch.distributed`` collective the code paths use."""

from __future__ import annotations

import threading

import pytest
import torch.distributed as dist
from scripts._common import TinyModel, pl
from threaded import run_threaded, trainer

from lightning_opt.strategies import LocalSGDStrategy, LookaheadStrategy, LSGDStrategy

pytestmark = pytest.mark.timeout(120)

COLLECTIVES = ("all_reduce", "broadcast", "barrier", "all_gather", "all_gather_into_tensor", "gather",
               "all_gather_object", "broadcast_object_list", "reduce_scatter", "scatter", "reduce")


@pytest.fixture
def counted(monkeypatch):
    """Per thread (rank), the collectives issued so far."""
    counts: dict[int, int] = {}
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def wrapper(*args, _original=original, **kwargs):
            key = threading.get_ident()
            counts[key] = counts.get(key, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(dist, name, wrapper)
    return counts


class PerStep(pl.Callback):
    """The collectives each optimizer step's batch issued (from the end of the previous batch to the end of this
    one, so the SIGTERM broadcast at the start of a batch counts for that batch's step)."""

    def __init__(self, counts: dict[int, int]) -> None:
        self.counts, self.per_step, self.last = counts, {}, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = self.counts.get(threading.get_ident(), 0)
        self.per_step[trainer.global_step] = now - self.last
        self.last = now

    def on_train_start(self, trainer, pl_module):
        self.last = self.counts.get(threading.get_ident(), 0)


def _steps_with_collectives(counted, make_strategy, steps: int) -> list[list[int]]:
    models = [TinyModel(bn=False) for _ in range(2)]

    def rank_fn(rank: int):
        cb = PerStep(counted)
        trainer(2, rank, make_strategy(), steps, [cb]).fit(models[rank])
        return [s for s, n in sorted(cb.per_step.items()) if n > 0]

    return run_threaded(2, rank_fn)


@pytest.mark.parametrize("make, expected", [
    # warm-up 2 (averaged), step 3 (its period is not known before it runs), then syncs after steps 6 and 10
    (lambda: LocalSGDStrategy(period=4, warmup_steps=2), [1, 2, 3, 6, 10]),
    (lambda: LocalSGDStrategy(period=3, outer_lr=0.7, outer_momentum=0.6), [1, 3, 6, 9]),
    (lambda: LSGDStrategy(period=5, pull=0.3), [1, 5, 10]),
    (lambda: LookaheadStrategy(period=4, mode="local"), [1, 4, 8]),
    # streamed, P = 2 of τ = 4: fragment 0 sends after steps 2, 6, 10 and fragment 1 after 4, 8; the SIGTERM flag
    # follows the clock's periods of 4 (steps 1, 4, 8)
    (lambda: LocalSGDStrategy(period=4, fragments=2), [1, 2, 4, 6, 8, 10]),
], ids=["local_sgd_warmup", "local_sgd_outer", "lsgd", "lookahead_local", "streamed"])
def test_only_steps_that_sync_or_average_communicate(counted, make, expected):
    assert _steps_with_collectives(counted, make, 10) == [expected, expected]


def test_steps_that_average_gradients_still_carry_the_sigterm_flag(counted):
    # Lookahead mode="sync" averages every step: every step communicates, the flag with it
    assert _steps_with_collectives(counted, lambda: LookaheadStrategy(period=4, mode="sync"), 6) == [
        list(range(1, 7))] * 2


class _EpochLoop:
    def __init__(self) -> None:
        self.sent = 0

    def _broadcast_sigterm_tensor(self) -> None:
        self.sent += 1


def test_the_gate_forwards_only_communicating_steps_and_undoes_only_itself():
    """The gate on a stand-in loop: the broadcast runs exactly when ``communicates()`` says so; ``undo`` brings
    back the loop's own method, but leaves alone a replacement someone installed after us; a trainer without the
    loop, or a loop without the broadcast (older Lightning), is left untouched."""
    from types import SimpleNamespace

    from lightning_opt.strategies._sigterm import broadcast_sigterm_only_when

    loop, answers = _EpochLoop(), iter([True, False, True])
    undo = broadcast_sigterm_only_when(SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=loop)),
                                       lambda: next(answers))
    for _ in range(3):
        loop._broadcast_sigterm_tensor()
    assert loop.sent == 2
    assert undo() is None and "_broadcast_sigterm_tensor" not in vars(loop)
    loop._broadcast_sigterm_tensor()
    assert loop.sent == 3  # the loop's own method again

    undo = broadcast_sigterm_only_when(SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=loop)), lambda: False)
    theirs = loop._broadcast_sigterm_tensor = lambda: None  # e.g. another plugin's wrapper, installed after ours
    undo()
    assert vars(loop)["_broadcast_sigterm_tensor"] is theirs
    for bare in (object(), SimpleNamespace(fit_loop=object()), SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=1))):
        assert broadcast_sigterm_only_when(bare, lambda: True)() is None


def test_an_averaged_step_sends_its_gradients_once(counted):
    """Lookahead sync mode, a step that does not sync: the SIGTERM flag broadcast and one all-reduce of the
    gradients (DDP's 1 MB first bucket holds this whole model; the flags ride in it). Sums redone at the step
    instead (plain bucketed averaging, two all-reduces under this 300-byte cap) would show."""
    models = [TinyModel(bn=False) for _ in range(2)]

    def rank_fn(rank: int):
        cb = PerStep(counted)
        trainer(2, rank, LookaheadStrategy(period=4, mode="sync", bucket_cap_mb=3e-4), 3, [cb]).fit(models[rank])
        return cb.per_step

    for per_step in run_threaded(2, rank_fn):
        assert per_step == {1: 2, 2: 2, 3: 2}
