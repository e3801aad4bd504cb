"""Lookahead's rules beyond the slow step (pinned against references in test_strategy_reference.py), in process:
sync mode's non-finite handling of the fast weights (a flag-only agreement, then rank 0's weights *and optimizer
state* copied over a bad rank), the momentum handling of every key it names, and its defaults."""

from __future__ import annotations

import warnings

import pytest
import torch
from scripts._common import Recorder, TinyModel, pl
from threaded import RankError, run_threaded, trainer

from lightning_opt.strategies import LookaheadStrategy
from lightning_opt.strategies.errors import NonFiniteError

pytestmark = pytest.mark.timeout(120)


class Spare(TinyModel):
    """TinyModel with a parameter the forward never uses: it gets no gradient and no optimizer state, so a NaN
    written into it reaches the fast weights at a sync without passing through a gradient average first."""

    def __init__(self, **kw) -> None:
        super().__init__(bn=False, **kw)
        self.spare = torch.nn.Parameter(torch.zeros(1))


class PoisonFastWeights(pl.Callback):
    """After step 5 on rank 1: NaN into the spare parameter and into the momentum of the last bias (one element),
    which the step-6 update then spreads into that bias."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 5:
            with torch.no_grad():
                pl_module.spare.fill_(float("nan"))
                trainer.optimizers[0].state[pl_module.net[3].bias]["momentum_buffer"].fill_(float("nan"))


class Summers(pl.Callback):
    """Each rank's gradient summer after every step (shared by the ranks: keyed by rank)."""

    def __init__(self) -> None:
        self.seen: dict[int, set[int]] = {0: set(), 1: set()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen[trainer.global_rank].add(id(trainer.strategy._grad_sums[0]))


def _fit(make, steps, policy_callbacks=(), model=Spare, **model_kw):
    models = [model(**model_kw) for _ in range(2)]

    def rank_fn(rank):
        strategy, rec = make(), Recorder()
        trainer(2, rank, strategy, steps, [rec, *policy_callbacks]).fit(models[rank])
        return strategy, models[rank], rec

    return run_threaded(2, rank_fn)


def test_sync_mode_raise_names_the_fast_weights_on_every_rank():
    with pytest.raises(RankError) as info:
        _fit(lambda: LookaheadStrategy(period=3, alpha=0.3), 9, [PoisonFastWeights()], momentum=0.9)
    for exc in info.value.errors:
        assert isinstance(exc, NonFiniteError)
        assert str(exc).startswith("non-finite fast weights on rank(s) [1] at optimizer step 6;"), exc


def test_sync_mode_drop_copies_rank_0s_weights_and_optimizer_state_over_the_bad_rank():
    """At the sync after step 6 rank 1 gets rank 0's fast weights and momentum buffers (the one-element bias
    buffer included), with a warning; the ranks then train identically. The sync's only
    collectives are the 2-float flag vector and the broadcast (129 + 1 weights, 129 momentum floats); each rank's
    gradient buckets are built once and reused on every step."""
    summers = Summers()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = _fit(lambda: LookaheadStrategy(period=3, alpha=0.3, nonfinite="drop"), 9,
                    [PoisonFastWeights(), summers], momentum=0.9)
    assert [len(ids) for ids in summers.seen.values()] == [1, 1]
    mine = [w for w in caught if "fast weights" in str(w.message)]
    assert [str(w.message) for w in mine] == ["rank 1: non-finite fast weights at optimizer step 6; reset to rank "
                                              "0's weights and optimizer state"]
    (s0, m0, r0), (s1, m1, r1) = runs
    torch.testing.assert_close(r1.params[6:], r0.params[6:], atol=0, rtol=0)
    assert torch.isfinite(r1.params[-1]).all() and torch.isfinite(m1.spare).all()
    opt0, opt1 = (m.trainer.optimizers[0] for m in (m0, m1))
    for p0, p1 in zip(m0.net.parameters(), m1.net.parameters()):
        assert torch.equal(opt0.state[p0]["momentum_buffer"], opt1.state[p1]["momentum_buffer"])
    # each step: the gradient buckets (the spare's zeros included) carrying 2 flags, the late flag, 5 grad counts
    grad_step = 130 * 4 + 4 * (2 + 1 + 5)
    assert s0.meter.bytes == 9 * grad_step + 3 * 2 * 4 + (130 + 129) * 4


@pytest.mark.parametrize("mode", ["sync", "local"])
def test_reset_zeroes_every_named_moment_and_pullback_skips_parameters_without_state(mode):
    """``momentum_keys`` names two of Adam's moments: a "reset" sync zeroes both (not only the first found);
    "pullback" keeps its slow copy under ``lookahead_slow_momentum:<key>`` and leaves the state-less spare
    parameter alone."""
    runs = _fit(lambda: LookaheadStrategy(period=3, alpha=0.3, mode=mode, pullback_momentum="reset",
                                          momentum_keys=("exp_avg", "exp_avg_sq")), 6, opt="adam", lr=0.01)
    for _, model, _ in runs:
        state = model.trainer.optimizers[0].state
        assert model.spare not in state
        for p in model.net.parameters():
            assert not state[p]["exp_avg"].any() and not state[p]["exp_avg_sq"].any()
    runs = _fit(lambda: LookaheadStrategy(period=3, alpha=0.3, mode=mode, pullback_momentum="pullback"), 6,
                momentum=0.9)
    for _, model, _ in runs:
        state = model.trainer.optimizers[0].state
        for p in model.net.parameters():
            assert torch.equal(state[p]["lookahead_slow_momentum:momentum_buffer"], state[p]["momentum_buffer"])


def test_defaults():
    """k = 5, α = 0.5 and synchronous Lookahead by default (Zhang et al. 2019's settings); one key may be a str.
    (The messages are pinned in test_bad_inputs.py.)"""
    assert repr(LookaheadStrategy()) == ("LookaheadStrategy(period=ConstantPeriod(5), alpha=0.5, mode='sync', "
                                         "pullback_momentum='none')")
    assert LookaheadStrategy(momentum_keys="exp_avg").momentum_keys == ("exp_avg",)
