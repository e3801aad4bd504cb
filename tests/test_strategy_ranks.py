"""The rules that need several workers, in process (one thread per rank, tests/threaded.py), by value against
float64 references: averaging over the *healthy* ranks under ``nonfinite="drop"`` (weights and gradients),
``raise`` on every rank, LSGD's group and global pulls with λ ≠ λ_G, EASGD with N = 3. Asymmetric settings, so a
coefficient and its complement cannot both pass. The same rules on real gloo processes are in the per-strategy
files; these are the fast ones ``make mutate`` runs.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from reference import Worker, lookahead, mean
from scripts._common import Recorder, TinyModel, flat_params, pl, recording
from threaded import RankError, run_threaded, trainer

from lightning_opt.strategies import EASGDStrategy, LocalSGDStrategy, LookaheadStrategy, LSGDStrategy
from lightning_opt.strategies.errors import NonFiniteError

pytestmark = pytest.mark.timeout(120)


class PoisonWeights(pl.Callback):
    """Writes NaN into the first weight of rank ``rank`` after optimizer step ``step``."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


def _fit_ranks(world: int, make_strategy, steps: int, models=None, callbacks=()):
    """Run ``make_strategy()`` on ``world`` threaded ranks; per rank: (strategy, model, recorded params)."""
    models = models or [TinyModel(bn=False) for _ in range(world)]

    def rank_fn(rank: int):
        strategy, rec = make_strategy(), Recorder()
        trainer(world, rank, strategy, steps, [rec, *callbacks]).fit(models[rank])
        return strategy, models[rank], torch.stack(rec.params).double()

    return run_threaded(world, rank_fn)


@pytest.mark.parametrize("outer", [False, True], ids=["plain", "outer"])
def test_drop_averages_the_healthy_ranks_over_the_healthy_count(outer):
    """3 ranks, rank 1's weights NaN after step 4; at the sync after step 6 every rank gets the mean of ranks 0
    and 2's pre-sync weights (÷ 2, not ÷ 3), or the outer step on it: Δ = a − x̄_healthy, m = μ m + Δ,
    a ← a − η m (η = 0.7, μ = 0.6)."""
    kw = {"outer_lr": 0.7, "outer_momentum": 0.6} if outer else {}
    runs = _fit_ranks(3, lambda: recording(LocalSGDStrategy)(period=3, nonfinite="drop", **kw), 9,
                      models=[TinyModel(bn=False, momentum=0.9) for _ in range(3)],
                      callbacks=[PoisonWeights(rank=1, step=4)])
    pre = [s.pre[1].double() for s, _, _ in runs]
    assert not torch.isfinite(pre[1]).all() and torch.isfinite(pre[0]).all()
    healthy = (pre[0] + pre[2]) / 2
    if outer:  # the anchor starts at x₀; the first sync (step 3) averages all three ranks
        x0 = flat_params(TinyModel(bn=False)).double()
        m1 = x0 - sum(st.pre[0].double() for st, _, _ in runs) / 3
        a1 = x0 - 0.7 * m1
        expected = a1 - 0.7 * (0.6 * m1 + (a1 - healthy))
    else:
        expected = healthy
    for strategy, _, params in runs:
        torch.testing.assert_close(strategy.post[1].double(), expected, atol=1e-6, rtol=0)
        assert torch.isfinite(params[-1]).all()


def test_drop_on_gradients_steps_with_the_healthy_mean_gradient():
    """Per-step averaging (warm-up): rank 1's loss is NaN at step 2, so at that step every rank takes
    x ← x − η (g₀ + g₂)/2; at the other steps x ← x − η (g₀ + g₁ + g₂)/3 (η = 0.05, no momentum)."""

    class NaNLoss(TinyModel):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.global_rank == 1 and self.trainer.global_step == 1 else loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = _fit_ranks(3, lambda: LocalSGDStrategy(period=2, warmup_steps=3, nonfinite="drop"), 3,
                          models=[NaNLoss(bn=False) for _ in range(3)])
    # only the gradient is replaced: the weights and optimizer state stay the others', nothing is reset
    assert [str(w.message) for w in caught if "non-finite" in str(w.message)] == [
        "rank 1: non-finite gradients at optimizer step 2; excluded from the average (this rank steps with the "
        "healthy ranks' mean gradient)"]
    workers = [Worker(r, 3) for r in range(3)]
    for t in range(3):
        grads = [w.grad(t) for w in workers]
        use = [grads[0], grads[2]] if t == 1 else grads
        x = [p - 0.05 * g for p, g in zip(workers[0].x, mean(use))]
        for w in workers:
            w.x = list(x)
        for _, _, params in runs:
            torch.testing.assert_close(params[t], workers[0].flat(), atol=2e-6, rtol=1e-5)


def test_a_rank_whose_step_raises_during_an_averaged_step_stops_the_others_at_once():
    """Lookahead sync mode averages gradients every step. Rank 1's training_step raises at step 3: it still issues
    the step's collectives (flagged bad, so the gradient sums stay the same size on every rank) and re-raises its
    own error; rank 0 refuses the step with NonFiniteError naming rank 1 instead of waiting out the timeout."""

    class Fails(TinyModel):
        def training_step(self, batch, batch_idx):
            if self.global_rank == 1 and self.trainer.global_step == 2:
                raise KeyError("bad record")
            return super().training_step(batch, batch_idx)

    with pytest.raises(RankError) as info:
        _fit_ranks(2, lambda: LookaheadStrategy(period=3, alpha=0.3), 6, models=[Fails(bn=False) for _ in range(2)])
    first, second = info.value.errors
    assert isinstance(first, NonFiniteError) and "rank(s) [1] at optimizer step 3" in str(first), first
    assert isinstance(second, KeyError) and "bad record" in str(second), second


@pytest.mark.parametrize("strategy", ["lookahead_sync", "local_sgd_outer", "easgd"])
def test_a_param_group_added_mid_fit_joins_the_averages(strategy):
    """The strategies keep per-parameter state (slow weights, anchors, outer momentum, EASGD's centre) aligned with
    the optimizer's parameters, a list rebuilt only when the param groups change. A group added after step 3 (as
    fine-tuning callbacks unfreeze a backbone) joins at once: it trains, the ranks (on different data) hold the
    same value after the last sync (Lookahead sync: after every step), and the DDP-equivalent byte count grows by
    its size from step 4 on. (Before, the state lists kept their old length and the next sync crashed.)"""

    class Late(TinyModel):
        def __init__(self):
            super().__init__(bn=False)
            self.scale = torch.nn.Parameter(torch.ones(3))

        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * self.scale.sum() / 3

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=self.lr)

    class Unfreeze(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                trainer.optimizers[0].add_param_group({"params": [pl_module.scale]})

    make = {"lookahead_sync": lambda: LookaheadStrategy(period=2, alpha=0.3),
            "local_sgd_outer": lambda: LocalSGDStrategy(period=2, outer_lr=0.7, outer_momentum=0.6),
            "easgd": lambda: EASGDStrategy(period=2, beta=0.43)}[strategy]
    (s0, m0, _), (_, m1, _) = _fit_ranks(2, make, 8, models=[Late(), Late()], callbacks=[Unfreeze()])
    assert torch.isfinite(m0.scale).all() and not torch.equal(m0.scale.detach(), torch.ones(3))  # it trained
    if strategy != "easgd":  # EASGD's elastic pull leaves the workers apart by design
        torch.testing.assert_close(m0.scale.detach(), m1.scale.detach(), atol=0, rtol=0)
    base = sum(p.numel() * 4 for p in m0.net.parameters())
    assert s0.meter.ddp_bytes == 8 * base + 5 * 3 * 4  # steps 4-8 carry the 3 new floats


@pytest.mark.parametrize("strategy,where", [("local_sgd", "parameters on rank(s) [1] at optimizer step 6"),
                                             ("lookahead_sync", "gradients on rank(s) [1] at optimizer step 5"),
                                             ("lsgd", "parameters on rank(s) [1] at optimizer step 6"),
                                             ("easgd", "on rank(s) [1] at optimizer step 6")])
def test_raise_raises_on_every_rank_naming_the_bad_rank_and_step(strategy, where):
    """Rank 1's weights go NaN after step 4: the sync after step 6 (Lookahead sync mode: the gradient average of
    step 5) raises NonFiniteError on both ranks, naming rank 1 and the step."""
    make = {"local_sgd": lambda: LocalSGDStrategy(period=3),
            "lookahead_sync": lambda: LookaheadStrategy(period=3, alpha=0.3),
            "lsgd": lambda: LSGDStrategy(period=3, pull=0.25),
            "easgd": lambda: EASGDStrategy(period=3, beta=0.43)}[strategy]
    with pytest.raises(RankError) as info:
        _fit_ranks(2, make, 9, callbacks=[PoisonWeights(rank=1, step=4)])
    for exc in info.value.errors:
        assert isinstance(exc, NonFiniteError), info.value.errors
        assert where in str(exc), str(exc)


def test_lookahead_sync_drop_copies_a_healthy_rank_over_the_bad_one():
    """Sync mode keeps the fast weights identical; rank 1's NaN weight (after step 4) survives step 5 (its NaN
    gradient is replaced by rank 0's), then at the sync after step 6 rank 0's fast weights are copied over it and
    the slow step z ← z + α(x − z) (α = 0.3) runs on them."""
    runs = _fit_ranks(2, lambda: recording(LookaheadStrategy)(period=3, alpha=0.3, nonfinite="drop"), 6,
                      callbacks=[PoisonWeights(rank=1, step=4)])
    (s0, _, p0), (s1, _, p1) = runs
    z = p0[2]  # slow weights after the first sync (fast == slow then)
    expected = z + 0.3 * (s0.pre[1].double() - z)
    for s in (s0, s1):
        torch.testing.assert_close(s.post[1].double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(p0[5:], p1[5:])
    bad = ~torch.isfinite(p1[4])
    assert bad[0] and bad.sum() == 1 and torch.equal(p0[4][1:], p1[4][1:])  # only the poisoned weight differed


OFFSETS = [3.0, 1.0, 2.0, 0.5]  # group {0, 1}: leader 1; group {2, 3}: leader 3; global leader 3


class Offset(TinyModel):
    """Training loss shifted per rank by a constant: the gradients are unchanged and the leader is known."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + OFFSETS[self.global_rank]


def test_lsgd_group_pulls_then_global_pull_with_their_own_lambdas():
    """Teng et al. 2019, multi-leader: every τ = 2 steps x ← x − λ(x − x̃_group), λ = 0.25; every τ_G = 4 steps
    then x ← x − λ_G(x − x̃_global), λ_G = 0.6, on the group-pulled weights."""
    lam, lam_g = 0.25, 0.6
    runs = _fit_ranks(4, lambda: recording(LSGDStrategy)(period=2, pull=lam, global_pull=lam_g, group_size=2,
                                                        global_period=4, leader_window=2), 8,
                      models=[Offset(bn=False) for _ in range(4)])
    assert [h["leader"] for h in runs[0][0].history] == [3, 3, 3, 3]
    group_leader = [1, 1, 3, 3]
    for k, global_sync in enumerate([False, True, False, True]):
        pre = [s.pre[k].double() for s, _, _ in runs]
        local = [pre[r] - lam * (pre[r] - pre[group_leader[r]]) for r in range(4)]
        expected = [y - lam_g * (y - local[3]) for y in local] if global_sync else local
        for r, (s, _, _) in enumerate(runs):
            torch.testing.assert_close(s.post[k].double(), expected[r], atol=1e-6, rtol=0)


def test_lsgd_pull_one_copies_the_argmin_leader_over_four_workers():
    """λ = 1 copies the leader exactly; the leader is the arg-min of the windowed losses (rank 3, offset 0.5)."""
    runs = _fit_ranks(4, lambda: recording(LSGDStrategy)(period=2, pull=1.0, group_size=4, leader_window=2), 8,
                      models=[Offset(bn=False) for _ in range(4)])
    history = runs[0][0].history
    assert [h["leader"] for h in history] == [3, 3, 3, 3]
    scores = torch.tensor(history[0]["scores"])
    assert int(torch.argmin(scores)) == 3 and scores[0] - scores[3] > 2.0
    for s, _, _ in runs:
        assert all(torch.equal(post, pre) for post, pre in zip(s.post, runs[3][0].pre))


def test_lsgd_drop_resets_the_bad_worker_to_its_leader_and_never_elects_it():
    """Rank 1 (offset 1.0 < 3.0: the leader) goes NaN after step 3: at the sync after step 4 it is out of the
    election (score ∞), rank 0 leads and rank 1 is reset to it exactly (λ = 1 for a reset, not λ = 0.25)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = _fit_ranks(2, lambda: recording(LSGDStrategy)(period=2, pull=0.25, leader_window=2,
                                                            nonfinite="drop"),
                          6, models=[Offset(bn=False) for _ in range(2)], callbacks=[PoisonWeights(rank=1, step=3)])
    assert [str(w.message) for w in caught if "LSGD" in str(w.message)] == [
        "LSGD: rank 1 has non-finite parameters at optimizer step 4; dropped from the leader election and reset to "
        "its leader (rank 0)"]
    (s0, _, _), (s1, _, _) = runs
    assert [h["leader"] for h in s0.history[:2]] == [1, 0] and s0.history[1]["scores"][1] == float("inf")
    torch.testing.assert_close(s1.post[1], s0.pre[1], atol=0, rtol=0)  # reset to rank 0 exactly
    torch.testing.assert_close(s0.post[1], s0.pre[1], atol=0, rtol=0)  # the leader does not move


def test_easgd_three_workers_elastic_step():
    """EASGD (Zhang et al. 2015, eq. (5)–(6)), N = 3, β = 0.43, α = β / 3: x_i ← x_i − α(x_i − x̃),
    x̃ ← x̃ + α Σ_i (x_i − x̃), the pre-sync values on the right."""
    beta = 0.43
    runs = _fit_ranks(3, lambda: recording(EASGDStrategy)(period=3, beta=beta), 9)
    alpha = beta / 3
    center = flat_params(TinyModel(bn=False)).double()
    for k in range(3):
        pre = [s.pre[k].double() for s, _, _ in runs]
        for r, (s, _, _) in enumerate(runs):
            torch.testing.assert_close(s.post[k].double(), pre[r] - alpha * (pre[r] - center), atol=1e-6, rtol=0)
        move = alpha * sum(x - center for x in pre)
        center = center + move
    for strategy, _, _ in runs:  # what it reports: the norm of the last centre step α Σ_i (x_i − x̃)
        assert strategy.last_center_step_norm == pytest.approx(float(move.norm()), rel=1e-5)
    for _, model, _ in runs:
        torch.testing.assert_close(flat_params(model).double(), center, atol=1e-6, rtol=0)  # fit hands back x̃


def test_easgd_drop_leaves_the_bad_worker_out_of_the_centre_and_resets_it_there():
    """N = 2, β = 0.43 (α = β / 2), rank 1 NaN after step 4: at the sync after step 6 the centre moves by
    α (x₀ − x̃) only, rank 0 takes its elastic step, and rank 1 restarts from the new centre with its optimizer
    state cleared."""
    alpha = 0.43 / 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = _fit_ranks(2, lambda: recording(EASGDStrategy)(period=3, beta=0.43, nonfinite="drop"), 6,
                          models=[TinyModel(bn=False, momentum=0.9) for _ in range(2)],
                          callbacks=[PoisonWeights(rank=1, step=4)])
    (s0, m0, _), (s1, m1, _) = runs
    x0 = flat_params(TinyModel(bn=False)).double()
    center = x0 + alpha * sum(s.pre[0].double() - x0 for s in (s0, s1))  # after the first sync (step 3)
    healthy = s0.pre[1].double()
    new_center = center + alpha * (healthy - center)
    torch.testing.assert_close(s0.post[1].double(), healthy - alpha * (healthy - center), atol=1e-6, rtol=0)
    torch.testing.assert_close(s1.post[1].double(), new_center, atol=1e-6, rtol=0)
    assert m1.trainer.optimizers[0].state == {} and len(m0.trainer.optimizers[0].state) > 0
    assert [str(w.message) for w in caught if "non-finite" in str(w.message)] == [
        "rank 1: non-finite parameters at optimizer step 6; excluded from the average and reset to the consensus "
        "(its optimizer state is cleared)"]


def test_a_failing_rank_never_hangs_the_others():
    """The harness itself: rank 0 fails before a collective that rank 1 waits in; rank 1 is woken after the grace
    period and the failure reaches the test as rank 0's exception."""

    def fn(rank: int):
        if rank == 0:
            raise ValueError("rank 0 fails first")
        torch.distributed.all_reduce(torch.ones(1))

    with pytest.raises(RankError, match="rank 0 raised ValueError") as info:
        run_threaded(2, fn, timeout=30, grace=0.5)
    assert isinstance(info.value.errors[0], ValueError) and info.value.errors[1] is not None


@pytest.mark.parametrize("pullback", ["none", "pullback"])
def test_lookahead_local_mode_is_the_multi_agent_form(pullback):
    """Local mode, 2 ranks: no per-step communication; at a sync z ← z + α(x̄ − z), x̄ the workers' mean,
    α = 0.3, and each worker's momentum is pulled back toward its own momentum at the last sync."""
    runs = _fit_ranks(2, lambda: LookaheadStrategy(period=3, alpha=0.3, mode="local", pullback_momentum=pullback),
                      12, models=[TinyModel(bn=False, momentum=0.9) for _ in range(2)])
    refs = lookahead(0.3, 3, 12, pullback, world=2)
    for (strategy, _, params), ref in zip(runs, refs):
        torch.testing.assert_close(params, ref, atol=2e-6, rtol=1e-5)
        assert strategy.meter.syncs == 4
    assert not torch.equal(runs[0][2][1], runs[1][2][1])  # the workers differ between syncs
