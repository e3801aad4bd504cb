"""The strategies' update rules, in process, against float64 references written from the papers' equations.

One rank (``devices=1``) still runs every rule that does not need a second worker: Lookahead's slow step and
its momentum handling, the Local SGD outer optimizer (SlowMo / DiLoCo) and the EASGD elastic step (α = β / 1).
Each reference below re-implements the inner optimizer too (plain tensor arithmetic in float64, gradients from
autograd on a float64 copy of the network), so no line of ``lightning_opt`` or ``torch.optim`` is in the oracle.
Asymmetric settings throughout (α = 0.3, β = 0.43, outer lr 0.7, outer momentum 0.6) so that a rule written with
``1 − α`` or with swapped coefficients cannot pass. These are the fast tests ``make mutate`` runs; the two-process
files check the same rules across ranks.
"""

from __future__ import annotations

import pytest
import torch
from reference import MU, HeavyBall, Worker, local_sgd_outer, lookahead
from scripts._common import Recorder, TinyModel, flat_params, pl
from threaded import run_threaded, trainer

from lightning_opt.callbacks import CURVATURE_ATTR
from lightning_opt.strategies import (
    ConstantHorizon,
    CurvatureAdaptivePeriod,
    EASGDStrategy,
    LocalSGDStrategy,
    LookaheadStrategy,
)
from lightning_opt.strategies.lsgd import pull_

pytestmark = pytest.mark.timeout(120)

STEPS, K = 12, 3


def _fit(strategy, steps: int = STEPS, model: TinyModel | None = None, **model_kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat parameters after each optimizer step of TinyModel(bn=False) under ``strategy`` (1 device), and the
    weights ``fit`` hands back. The one rank runs on the threaded process group (tests/threaded.py) rather than
    gloo: a gloo group in the pytest process would not survive the fork of each mutant under ``make mutate``."""
    model, rec = model or TinyModel(bn=False, **{"momentum": MU, **model_kw}), Recorder()
    run_threaded(1, lambda rank: trainer(1, rank, strategy, steps, [rec]).fit(model))
    return torch.stack(rec.params).double(), flat_params(model).double()


@pytest.mark.parametrize("pullback", ["none", "reset", "pullback"])
def test_lookahead_slow_step_and_momentum_handling(pullback):
    ours, final = _fit(LookaheadStrategy(period=K, alpha=0.3, pullback_momentum=pullback))
    torch.testing.assert_close(final, ours[-1])  # step 12 is a sync: the slow weights are the model
    torch.testing.assert_close(ours, lookahead(0.3, K, STEPS, pullback)[0], atol=2e-6, rtol=1e-5)


def test_lookahead_pullback_acts_on_adams_first_moment():
    ours, _ = _fit(LookaheadStrategy(period=K, alpha=0.3, pullback_momentum="pullback"), opt="adam", lr=0.01)
    torch.testing.assert_close(ours, lookahead(0.3, K, STEPS, "pullback", adam=True)[0], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("nesterov", [False, True], ids=["slowmo", "diloco"])
def test_local_sgd_outer_optimizer(nesterov):
    ours, _ = _fit(LocalSGDStrategy(period=K, outer_lr=0.7, outer_momentum=0.6, outer_nesterov=nesterov))
    torch.testing.assert_close(ours, local_sgd_outer(0.7, 0.6, nesterov, K, STEPS)[0], atol=2e-6, rtol=1e-5)


def test_easgd_elastic_step_on_one_worker():
    """EASGD (Zhang, Choromanska & LeCun 2015, eq. (5)–(6)) with N = 1, so α = β: x ← x − α(x − x̃),
    x̃ ← x̃ + α(x − x̃) with the pre-update x on the right; x̃₀ = x₀. The weights stay apart from the centre."""
    beta = 0.43
    w = Worker()
    inner = HeavyBall(w)
    center, ref = list(w.x), []
    for t in range(STEPS):
        inner.step(t)
        if (t + 1) % K == 0:
            pre = list(w.x)
            w.x = [x - beta * (x - c) for x, c in zip(pre, center)]
            center = [c + beta * (x - c) for c, x in zip(center, pre)]
        ref.append(w.flat())
    ours, final = _fit(EASGDStrategy(period=K, beta=beta))
    torch.testing.assert_close(ours, torch.stack(ref), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(final, torch.cat([c.reshape(-1) for c in center]), atol=2e-6, rtol=1e-5)  # the centre


class _Decay(TinyModel):
    """SGD at lr 0.1 halved every 6 steps (StepLR stepped after each optimizer step)."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 6, 0.5),
                                                   "interval": "step"}}


def test_constant_horizon_grows_the_period_as_the_lr_decays():
    """τ = round(s / lr) with s = 0.3, asked at the start and at each sync with the lr of the step just taken:
    lr 0.1 for steps 1-6, 0.05 for 7-12, 0.025 for 13-18. Start: τ = 3 → syncs at 3 and 6 (lr still 0.1) → at 9
    (lr 0.05) τ = 6 → at 15 (lr 0.025) τ = 12 → the next would be at 27."""
    syncs: list[int] = []

    class Counting(LookaheadStrategy):
        def _sync(self, idx, step):
            syncs.append(step)
            super()._sync(idx, step)

    s = Counting(period=ConstantHorizon(0.3), alpha=0.3)
    ours, final = _fit(s, steps=24, model=_Decay(bn=False))
    assert not torch.allclose(final, ours[-1])  # step 24 is mid-period: fit hands back the slow weights
    assert syncs == [3, 6, 9, 15] and s.clock.period[0] == 12


class Publish(pl.Callback):
    """Stands in for SharpnessMonitor: publishes λ_min = −2 on the trainer before the first step."""

    def on_train_start(self, trainer, pl_module):
        setattr(trainer, CURVATURE_ATTR, {"lambda_min": -2.0, "step": 0})


def test_curvature_adaptive_period_reads_the_published_curvature_and_lookaheads_horizon_factor():
    """Curvature paper Cor. 5.4: τ = ⌊c / (γ (1 − α) |λ_min|)⌋ = ⌊0.5 / (0.05 · 0.7 · 2)⌋ = 7 for one-worker
    Lookahead with α = 0.3 (without the trainer's curvature it would keep its default period, 2)."""
    schedule = CurvatureAdaptivePeriod(c=0.5, default_period=2)
    strategy, model, rec = LookaheadStrategy(period=schedule, alpha=0.3), TinyModel(bn=False, momentum=MU), Recorder()
    run_threaded(1, lambda rank: trainer(1, rank, strategy, 8, [rec, Publish()]).fit(model))
    assert (schedule.last_lambda_min, schedule.last_measured_step, schedule.last_period) == (-2.0, 0, 7)
    assert strategy.meter.syncs == 1 and strategy.clock.period[0] == 7


def test_timm_lookahead_differs_only_by_its_lazy_first_slow_update():
    """timm creates its slow copy at the first sync (a no-op update); ours starts at x₀ as in the papers' Alg. 1,
    so the trajectories agree before step k and differ from it on."""
    from timm.optim import Lookahead

    model = TinyModel(bn=False)
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.05, momentum=MU), alpha=0.3, k=K)
    w, theirs = Worker(), []
    for t in range(STEPS):
        x, y = w.inputs[8 * t: 8 * t + 8].float(), w.target[8 * t: 8 * t + 8].float()
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        theirs.append(flat_params(model).double())
    ours = lookahead(0.3, K, STEPS)[0]
    torch.testing.assert_close(theirs[K - 2], ours[K - 2], atol=1e-6, rtol=1e-5)
    assert (theirs[K - 1] - ours[K - 1]).abs().max() > 1e-3  # ours pulls back toward x₀ at step k; timm does not


def test_lsgd_pull_moves_a_fraction_lambda_toward_the_leader():
    """Teng et al. 2019, eq. (3): x ← x − λ(x − x̃), per coordinate, λ = 0.25 (the ranks' part is in test_lsgd)."""
    x = [torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64), torch.tensor([[0.5]], dtype=torch.float64)]
    leader = [torch.tensor([3.0, 2.0, -4.0], dtype=torch.float64), torch.tensor([[-1.5]], dtype=torch.float64)]
    pull_(x, leader, 0.25)
    assert x[0].tolist() == [1.5, -1.0, 2.0] and x[1].tolist() == [[0.0]]
    assert leader[0].tolist() == [3.0, 2.0, -4.0]  # the leader's copy is read, not written
