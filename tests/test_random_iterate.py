"""RandomIterate: Stochastic INGD's output rule (thesis ch. 5 Alg. 3 lines 8-10) — its law, a fit with
StochasticINGD, exact resume, refusal of rank-local strategies."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from scripts._common import CaptureLogger, TinyModel, trainer

from lightning_opt.callbacks import RandomIterate
from lightning_opt.optim import StochasticINGD
from lightning_opt.strategies import LocalSGDStrategy

pytestmark = pytest.mark.timeout(120)


def _draw(steps: int, lag: int, seed: int) -> int:
    cb = RandomIterate(lag=lag, seed=seed)
    for m in range(1, steps + 2):  # x_1 .. x_{T+1}
        cb._offer([torch.tensor(float(m))])
        assert len(cb._history) <= lag + 2  # pruned as it goes: one entry <= T - K, then candidates T-K+1 .. T+1
    j, (value,) = cb._rolled_back(steps)
    assert value.item() == j  # the entry carries its own iterate
    return j


@pytest.mark.parametrize("steps,lag", [(10, 3), (7, 0), (3, 3)])
def test_output_law_is_uniform_i_shifted_back_by_k(steps, lag):
    """i ~ U{1..T}, j = max(i - K, 1): P(j = 1) = (K + 1)/T, P(j = m) = 1/T for 2 <= m <= T - K (T <= K: j = 1)."""
    trials = 4000
    counts = Counter(_draw(steps, lag, seed) for seed in range(trials))
    expected = Counter()
    for i in range(1, steps + 1):
        expected[max(i - lag, 1)] += 1 / steps
    assert set(counts) == set(expected)
    for j, p in expected.items():
        assert counts[j] / trials == pytest.approx(p, abs=0.025), (j, counts)


class IngdModel(TinyModel):
    def configure_optimizers(self):
        return StochasticINGD(self.parameters(), lr=0.5, beta=0.7, p=1.0, q=4.0, seed=3)


class IterateRecorder(pl.Callback):
    """Records INGD's iterate x_t (x_1 at the start, then after every step) and the parameters (y)."""

    def __init__(self) -> None:
        self.x: list[list[torch.Tensor]] = []

    def _record(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.x.append([opt.state.get(p, {}).get("x", p).detach().clone() for p in pl_module.parameters()])

    def on_train_start(self, trainer, pl_module):
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._record(trainer, pl_module)


def _fit(tmp_path, max_steps: int, ckpt_path=None, checkpoint=False):
    model, rec, cb, logger = IngdModel(bn=False), IterateRecorder(), RandomIterate(lag=2, seed=11), CaptureLogger()
    callbacks = [rec, cb]
    if checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1))
    t = trainer("auto", max_steps=max_steps, callbacks=callbacks, devices=1, logger=logger,
                enable_checkpointing=checkpoint)
    t.fit(model, ckpt_path=ckpt_path)
    return model, rec, cb, logger


def test_fit_with_ingd_ends_on_the_drawn_iterate_and_resumes_to_the_same_draw(tmp_path):
    model, rec, cb, logger = _fit(tmp_path, 9, checkpoint=True)
    assert len(rec.x) == 10  # x_1 .. x_10
    assert 1 <= cb.chosen <= 9 - 2
    final = [p.detach() for p in model.parameters()]
    for p, x in zip(final, rec.x[cb.chosen - 1]):
        torch.testing.assert_close(p, x, rtol=0, atol=0)
    assert any(not torch.equal(p, x) for p, x in zip(final, rec.x[-1]))  # not the last iterate
    assert logger.values("random_iterate/step") == [cb.chosen - 1]
    resumed, _, cb2, _ = _fit(tmp_path, 9, ckpt_path=tmp_path / "epoch=0-step=4.ckpt")
    assert cb2.chosen == cb.chosen
    for p, q in zip(resumed.parameters(), final):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)


def test_other_optimizers_draw_among_the_parameters(tmp_path):
    model, cb = TinyModel(bn=False), RandomIterate(lag=0, seed=4)
    seen = []
    rec = IterateRecorder()
    rec._record = lambda trainer, pl_module: seen.append([p.detach().clone() for p in pl_module.parameters()])
    trainer("auto", max_steps=6, callbacks=[rec, cb], devices=1).fit(model)
    for p, x in zip(model.parameters(), seen[cb.chosen - 1]):
        torch.testing.assert_close(p.detach(), x, rtol=0, atol=0)


def test_rank_local_strategies_are_refused():
    cb = RandomIterate()
    with pytest.raises(ValueError, match="LocalSGDStrategy keeps rank-local weights"):
        cb.setup(SimpleNamespace(strategy=LocalSGDStrategy(period=2)), None, "fit")
    cb.setup(SimpleNamespace(strategy=object()), None, "fit")  # anything else is accepted
