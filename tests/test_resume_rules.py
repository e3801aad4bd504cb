"""Checkpoints in process (two threaded ranks; the gloo versions are in test_checkpoint*.py): a checkpoint taken
mid-period holds the consensus as its ``state_dict`` and every rank's own weights and callback state, and a resume
hands each rank its own back; a checkpoint written without our entry (a single-device or plain DDP run) resumes on
every rank from its weights, optimizer state and step, with one warning per rank that the sync schedule starts
afresh."""

from __future__ import annotations

import warnings

import pytest
import torch
from scripts._common import TinyModel, flat_params, pl
from scripts._common import trainer as scripts_trainer
from threaded import run_threaded, trainer

from lightning_opt.strategies import LocalSGDStrategy
from lightning_opt.strategies._checkpoint import CKPT_KEY

pytestmark = pytest.mark.timeout(120)


class Starts(TinyModel):
    """Records the weights and the momentum buffers at the start of every training batch."""

    def __init__(self) -> None:
        super().__init__(bn=False, momentum=0.9)
        self.starts: list[torch.Tensor] = []
        self.momenta: list[torch.Tensor] = []

    def on_train_batch_start(self, batch, batch_idx):
        self.starts.append(flat_params(self))
        state = self.trainer.optimizers[0].state
        if state:  # empty before the first step of a fresh run
            self.momenta.append(torch.cat([state[p]["momentum_buffer"].reshape(-1) for p in self.parameters()]))


def test_a_single_device_checkpoint_resumes_on_every_rank(tmp_path):
    path = tmp_path / "single.ckpt"
    single = scripts_trainer("auto", max_steps=3, devices=1)
    single.fit(Starts())
    single.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    weights = torch.cat([t.reshape(-1) for t in saved["state_dict"].values()])
    momentum = torch.cat([v["momentum_buffer"].reshape(-1) for _, v in sorted(
        saved["optimizer_states"][0]["state"].items())])
    models = [Starts(), Starts()]

    def rank_fn(rank: int):
        strategy = LocalSGDStrategy(period=2)
        trainer(2, rank, strategy, 5, []).fit(models[rank], ckpt_path=path)
        return strategy.clock.steps

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps = run_threaded(2, rank_fn)
    assert [str(w.message) for w in caught if "lightning_opt entry" in str(w.message)] == [
        f"{path} has no lightning_opt entry (written by another strategy, e.g. plain DDP): every rank starts from "
        "the saved weights, and the sync schedule, counters and outer state start afresh"] * 2
    for model in models:
        assert len(model.starts) == 2  # steps 4 and 5
        torch.testing.assert_close(model.starts[0], weights, atol=0, rtol=0)
        torch.testing.assert_close(model.momenta[0], momentum, atol=0, rtol=0)
    assert steps == [{0: 2}, {0: 2}]  # the strategy's step counters start afresh


class Tally(pl.Callback):
    """A callback with per-rank state (the batches this rank saw, offset by its rank)."""

    def __init__(self) -> None:
        self.seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += 1 + 10 * trainer.global_rank

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


class SaveAfter(pl.Callback):
    """Every rank saves the checkpoint (a collective) after optimizer step ``step``."""

    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_a_mid_period_checkpoint_holds_the_consensus_and_every_ranks_own_state(tmp_path):
    """τ = 4, saved after step 3 (mid-period: the ranks differ): the file's ``state_dict`` is their mean, our entry
    names the strategy and holds each rank's weights and callback state; resumed with the same world, rank r
    starts step 4 from its own weights and its own callback state."""
    path = tmp_path / "mid.ckpt"
    models, tallies = [Starts(), Starts()], [Tally(), Tally()]

    def first(rank: int):
        trainer(2, rank, LocalSGDStrategy(period=4), 4, [tallies[rank], SaveAfter(3, path)]).fit(models[rank])

    run_threaded(2, first)
    saved = torch.load(path, weights_only=False)
    entry = saved[CKPT_KEY]
    own = [torch.cat([t.reshape(-1) for n, t in r["module"].items() if "net" in n]) for r in entry["ranks"]]
    assert not torch.equal(own[0], own[1])
    consensus = torch.cat([t.reshape(-1) for t in saved["state_dict"].values()])
    torch.testing.assert_close(consensus, (own[0] + own[1]) / 2, atol=1e-7, rtol=0)
    assert (entry["world_size"], entry["strategy_name"]) == (2, "local_sgd")
    assert entry["strategy_repr"].startswith("LocalSGDStrategy(period=ConstantPeriod(4)")
    assert [r["callbacks"]["Tally"]["seen"] for r in entry["ranks"]] == [3, 33]

    resumed, tallies = [Starts(), Starts()], [Tally(), Tally()]

    def second(rank: int):
        trainer(2, rank, LocalSGDStrategy(period=4), 4, [tallies[rank]]).fit(resumed[rank], ckpt_path=path)

    run_threaded(2, second)
    for rank in range(2):
        torch.testing.assert_close(resumed[rank].starts[0], own[rank], atol=0, rtol=0)
    assert [t.seen for t in tallies] == [3 + 1, 33 + 11]
