"""Moving an existing run onto a lightning-opt strategy: a checkpoint written without our entry (a single-device or
plain DDP run) resumes on every rank from its weights, optimizer state and step, with one warning per rank that
the sync schedule starts afresh. In process (two threaded ranks); the gloo version with DDPStrategy is in
test_checkpoint*.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from scripts._common import TinyModel, flat_params, pl
from threaded import ThreadRank, run_threaded

from lightning_opt.strategies import LocalSGDStrategy

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


def _trainer(steps: int, **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_steps=steps, use_distributed_sampler=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, **kw)


def test_a_single_device_checkpoint_resumes_on_every_rank(tmp_path):
    path = tmp_path / "single.ckpt"
    single = _trainer(3, devices=1)
    single.fit(Starts())
    single.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    weights = torch.cat([t.reshape(-1) for t in saved["state_dict"].values()])
    momentum = torch.cat([v["momentum_buffer"].reshape(-1) for _, v in sorted(
        saved["optimizer_states"][0]["state"].items())])
    models = [Starts(), Starts()]

    def rank_fn(rank: int):
        strategy = LocalSGDStrategy(period=2)
        strategy.cluster_environment = ThreadRank(rank, 2)
        trainer = _trainer(5, devices=2, strategy=strategy)
        trainer.fit(models[rank], ckpt_path=path)
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
