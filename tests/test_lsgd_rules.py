"""LSGD's rules by value, in process (one thread per rank, tests/threaded.py): how workers are scored (the window
mean of their recent losses, or a logged metric under manual optimisation), what is logged at a sync, which
weights evaluation and ``fit`` hand back (``eval_weights``), the default group layout (one group per node, a
global pull every second sync) and what a skipped or reset pull says. The pulls themselves are pinned in
test_strategy_ranks.py; the same behaviour on gloo processes in test_lsgd.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from scripts._common import CaptureLogger, Recorder, TinyModel, recording
from threaded import RankError, ThreadRank, run_threaded, trainer

from lightning_opt.strategies import LSGDStrategy

pytestmark = pytest.mark.timeout(120)

OFFSETS = [3.0, 1.0]  # rank 1 leads


class Offset(TinyModel):
    """Training loss shifted per rank by a constant (gradients unchanged); ``losses`` holds the unshifted ones."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + OFFSETS[self.global_rank]


class PerNode(ThreadRank):
    """One process per node: rank r is node r's only (local rank 0) process."""

    def local_rank(self) -> int:
        return 0

    def node_rank(self) -> int:
        return self._rank


def _fit(make, steps, models, world=2, **trainer_kw):
    """Per rank: (strategy, model, recorder, rank 0's CaptureLogger or None)."""

    def rank_fn(rank):
        strategy, rec = make(), Recorder()
        logger = CaptureLogger() if rank == 0 else False
        trainer(world, rank, strategy, steps, [rec], logger=logger, log_every_n_steps=1,
                **trainer_kw).fit(models[rank])
        return strategy, models[rank], rec, logger or None

    return run_threaded(world, rank_fn)


def test_scores_are_window_means_and_the_sync_logs_leader_spread_and_score():
    """τ = 1, window 3: at the sync after step t each worker's score is the mean of its last min(t, 3) losses
    (its offset included); the leader is the arg-min; rank 0 logs leader, spread (max − min) and the leader's score,
    and the sync's bytes are the flag-and-score vector (2 × 2 floats) plus the leader's broadcast (129 floats)."""
    runs = _fit(lambda: LSGDStrategy(period=1, pull=0.25, leader_window=3), 5, [Offset(bn=False), Offset(bn=False)])
    s0, _, _, logger = runs[0]
    assert [h["step"] for h in s0.history] == [1, 2, 3, 4, 5]
    for t, h in enumerate(s0.history, start=1):
        expected = [sum(m.losses[max(0, t - 3):t]) / min(t, 3) + OFFSETS[r] for r, (_, m, _, _) in enumerate(runs)]
        torch.testing.assert_close(torch.tensor(h["scores"]), torch.tensor(expected), atol=1e-5, rtol=0)
        assert h["leader"] == 1
    assert logger.values("lsgd/leader") == [1.0] * 5
    spreads = [max(h["scores"]) - min(h["scores"]) for h in s0.history]
    torch.testing.assert_close(torch.tensor(logger.values("lsgd/score_spread")), torch.tensor(spreads))
    torch.testing.assert_close(torch.tensor(logger.values("lsgd/leader_score")),
                               torch.tensor([h["scores"][1] for h in s0.history]))
    assert s0.meter.bytes == 5 * (4 * 4 + 129 * 4) and s0.meter.syncs == 5 and s0.last_leader == 1
    assert logger.values("comm/bytes")[-1] == s0.meter.bytes


class Manual(TinyModel):
    """Manual optimisation: the training step returns nothing; it logs a per-rank constant under ``key``."""

    def __init__(self, key: str, scores: list[float]) -> None:
        super().__init__(bn=False)
        self.automatic_optimization = False
        self.key, self.scores = key, scores

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        self.log(self.key, torch.tensor(self.scores[self.global_rank]))
        opt.step()


@pytest.mark.parametrize("key", [None, "select/score"])
def test_manual_optimisation_scores_come_from_the_logged_metric(key):
    """Without a loss from the closure, the score is ``callback_metrics[score_key]`` (default ``"train/loss"``):
    the logged constants 0.4 and 2.5 make rank 0 the leader."""
    kw = {} if key is None else {"score_key": key}
    models = [Manual(key or "train/loss", [0.4, 2.5]) for _ in range(2)]
    runs = _fit(lambda: LSGDStrategy(period=2, pull=0.25, leader_window=4, **kw), 6, models)
    for h in runs[0][0].history:
        assert h["scores"] == pytest.approx([0.4, 2.5]) and h["leader"] == 0


def test_a_non_finite_score_never_leads():
    """A rank logging NaN (with finite weights) scores ∞, even though 0.4 < 2.5 would make it lead otherwise."""
    models = [Manual("train/loss", [float("nan"), 2.5]) for _ in range(2)]
    runs = _fit(lambda: LSGDStrategy(period=2, pull=0.25, leader_window=4), 4, models)
    for h in runs[0][0].history:
        assert h["scores"] == [float("inf"), pytest.approx(2.5)] and h["leader"] == 1


def test_no_finite_score_skips_the_pull_and_logs_no_leader():
    """A score key nobody logs leaves every window empty (score ∞): the pull is skipped with a warning, and the
    sync logs leader −1 with no spread and no leader score."""
    models = [Manual("train/loss", [1.0, 2.0]) for _ in range(2)]
    make = recording(LSGDStrategy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = _fit(lambda: make(period=2, pull=0.25, score_key="never/logged"), 4, models)
    s0, _, _, logger = runs[0]
    skipped = [w for w in caught if "no finite score" in str(w.message)]
    assert {str(w.message) for w in skipped} == {f"LSGD: no finite score at optimizer step {t}; skipping the pull"
                                                 for t in (2, 4)}
    for s, _, _, _ in runs:
        assert all(torch.equal(a, b) for a, b in zip(s.pre, s.post))
    assert logger.values("lsgd/leader") == [-1.0, -1.0] and s0.last_leader is None
    values = torch.tensor(logger.values("lsgd/score_spread") + logger.values("lsgd/leader_score"))
    assert torch.isnan(values).all()


@pytest.mark.parametrize("eval_weights", ["center", "leader", "local"])
def test_fit_hands_back_the_eval_weights(eval_weights):
    """After 7 steps (last pull after step 6, λ = 0.25, so the workers differ) ``fit`` leaves: ``center`` the
    workers' mean on every rank, ``leader`` the leader's (rank 1's) weights on every rank, ``local`` each rank's
    own weights."""
    runs = _fit(lambda: LSGDStrategy(period=2, pull=0.25, leader_window=2, eval_weights=eval_weights), 7,
                [Offset(bn=False), Offset(bn=False)])
    local = [rec.params[-1] for _, _, rec, _ in runs]
    assert not torch.equal(local[0], local[1])
    expected = {"center": [(local[0] + local[1]) / 2] * 2, "leader": [local[1]] * 2, "local": local}[eval_weights]
    for (_, model, _, _), want in zip(runs, expected):
        got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(got, want, atol=1e-7, rtol=0)


def test_one_process_per_node_makes_singleton_groups_and_a_global_pull_every_second_sync():
    """Default ``group_size``: the processes of a node (here 1). A group of one has no leader to follow, so the
    local syncs (after steps 2 and 6) leave the weights alone and every second sync (after steps 4 and 8) pulls
    toward the global leader with ``global_pull`` = ``pull`` = 0.25."""
    make = recording(LSGDStrategy)
    runs = _fit(lambda: make(period=2, pull=0.25, leader_window=2), 8, [Offset(bn=False), Offset(bn=False)],
                env=PerNode, devices=1, num_nodes=2)
    (s0, *_), (s1, *_) = runs
    assert s0.history[0]["leader"] == 1 and len(s0.history) == 4
    for k in (0, 2):
        assert torch.equal(s0.pre[k], s0.post[k]) and torch.equal(s1.pre[k], s1.post[k])
    for k in (1, 3):
        lead = s1.pre[k].double()
        torch.testing.assert_close(s0.post[k].double(), s0.pre[k].double() - 0.25 * (s0.pre[k].double() - lead),
                                   atol=1e-6, rtol=0)
        assert torch.equal(s1.post[k], s1.pre[k])  # the leader stays
    # every sync gathers the scores (2 flags + 2 scores); only the global pulls broadcast the leader (129 floats)
    assert s0.meter.bytes == 4 * 4 * 4 + 2 * 129 * 4


def test_a_group_size_that_does_not_divide_the_world_fails_at_setup():
    with pytest.raises(RankError) as info:
        _fit(lambda: LSGDStrategy(period=2, group_size=3), 2, [TinyModel(bn=False), TinyModel(bn=False)])
    for exc in info.value.errors:
        assert str(exc) == "invalid group_size=3; expected a divisor of the world size (2 processes)", exc


def test_defaults_follow_the_paper():
    """τ = 64, λ = λ_G = 0.1, a window of 10 batches, scored by ``train/loss``, evaluated at the centre."""
    s = LSGDStrategy()
    assert repr(s) == ("LSGDStrategy(period=ConstantPeriod(64), pull=0.1, leader_window=10, group_size=None, "
                       "global_period=None, global_pull=0.1)")
    assert (s.score_key, s.eval_weights, s.last_leader, s.history) == ("train/loss", "center", None, [])
    assert LSGDStrategy(period=2, global_period=6, global_pull=0.3, group_size=1).global_period == 6
    for ok in ("leader", "local"):
        assert LSGDStrategy(eval_weights=ok).eval_weights == ok
