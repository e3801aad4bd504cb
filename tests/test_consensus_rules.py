"""What a sync does to buffers and what evaluation sees, by value, in process (tests/threaded.py): BatchNorm
statistics averaged at a sync (or left alone with ``average_buffers=False``), an integer buffer that differs
between ranks taken from rank 0, the consensus swapped in for a validation loop mid-period and the local weights
swapped back after it, no consensus traffic when validation falls on a sync, the non-finite policy at that
consensus, several optimizers each on their own clock, what is kept out of ``callback_metrics``, and the buffers
broadcast after averaged steps listed again in a second fit."""

from __future__ import annotations

import warnings

import pytest
import torch
from scripts._common import CaptureLogger, Recorder, TinyModel, TwoOptimizers, flat_params, pl, recording
from threaded import RankError, run_threaded
from threaded import trainer as threaded_trainer

from lightning_opt.strategies import EASGDStrategy, LocalSGDStrategy, LookaheadStrategy
from lightning_opt.strategies.errors import NonFiniteError

pytestmark = pytest.mark.timeout(120)


class Counted(TinyModel):
    """TinyModel with BatchNorm and an integer buffer that grows by rank + 1 per step (so it differs between
    ranks); ``seen`` records the weights and BN mean each validation step sees, ``starts`` the weights at the start
    of each training batch."""

    def __init__(self) -> None:
        super().__init__(bn=True, momentum=0.9)
        self.register_buffer("count", torch.zeros(2, dtype=torch.int64))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.starts: list[torch.Tensor] = []

    def on_train_batch_start(self, batch, batch_idx):
        self.starts.append(flat_params(self))

    def training_step(self, batch, batch_idx):
        self.count += self.global_rank + 1
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.seen.append((flat_params(self), self.net[1].running_mean.clone()))


def _buffers(module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in module.named_buffers()}


class BufferRecording(recording(LocalSGDStrategy)):
    """Also records every buffer right before and after each sync."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.pre_buffers, self.post_buffers = [], []

    def _sync(self, idx, step):
        self.pre_buffers.append(_buffers(self.lightning_module))
        super()._sync(idx, step)
        self.post_buffers.append(_buffers(self.lightning_module))


def _fit(make, steps, models, val_every=None, callbacks=(), sanity=0, logger=False):
    world = len(models)

    def rank_fn(rank):
        strategy, rec = make(), Recorder()
        validation = {"val_check_interval": val_every, "limit_val_batches": 1} if val_every else {}
        trainer = threaded_trainer(world, rank, strategy, steps, [rec, *callbacks], num_sanity_val_steps=sanity,
                                   logger=CaptureLogger() if logger else False, log_every_n_steps=1, **validation)
        trainer.fit(models[rank])
        return strategy, models[rank], rec, trainer

    return run_threaded(world, rank_fn)


class Floor(TinyModel):
    """A float buffer with a by-design -inf entry (as a running minimum starts) next to one that differs between
    ranks (rank + step)."""

    def __init__(self) -> None:
        super().__init__(bn=False)
        self.register_buffer("floor", torch.tensor([float("-inf"), 0.0]))

    def training_step(self, batch, batch_idx):
        self.floor[1] = float(self.global_rank + self.trainer.global_step)
        return super().training_step(batch, batch_idx)


def test_a_buffers_by_design_non_finite_entries_are_averaged_not_refused():
    """The buffer differs between ranks, so a sync averages it; its -inf was there from the start (the buffer
    rules), so no rank is judged non-finite: the -inf stays and the other entry becomes the ranks' mean."""
    runs = _fit(lambda: LocalSGDStrategy(period=2), 4, [Floor(), Floor()])
    for _, model, _, _ in runs:  # after step 4: ranks wrote 0 + 3 and 1 + 3
        assert model.floor[0] == float("-inf") and model.floor[1] == 3.5


@pytest.mark.parametrize("average_buffers", [True, False])
def test_a_sync_averages_float_buffers_and_takes_integer_buffers_from_rank_0(average_buffers):
    runs = _fit(lambda: BufferRecording(period=3, average_buffers=average_buffers), 6, [Counted(), Counted()])
    (s0, *_), (s1, *_) = runs
    for k in range(2):
        pre = [s.pre_buffers[k] for s in (s0, s1)]
        assert not torch.equal(pre[0]["count"], pre[1]["count"])
        for r, s in enumerate((s0, s1)):
            post = s.post_buffers[k]
            assert torch.equal(post["count"], pre[0]["count"])  # rank 0's, on every rank
            assert torch.equal(post["net.1.num_batches_tracked"], pre[r]["net.1.num_batches_tracked"])
            for name in ("net.1.running_mean", "net.1.running_var"):
                want = (pre[0][name] + pre[1][name]) / 2 if average_buffers else pre[r][name]
                torch.testing.assert_close(post[name], want, atol=1e-7, rtol=0)


@pytest.mark.parametrize("make,synced", [
    (lambda: LocalSGDStrategy(period=4, fragments=2), (4, 8)),  # streamed: with the last fragment only
    (lambda: LookaheadStrategy(period=3, alpha=0.3, mode="local"), (3, 6)),
    # averaged steps broadcast the buffers from rank 0 after every step, as DDP does before every forward
    (lambda: LookaheadStrategy(period=3, alpha=0.3, mode="sync"), tuple(range(1, 9))),
], ids=["streamed", "lookahead_local", "lookahead_sync"])
def test_when_each_mode_makes_the_bn_statistics_agree(make, synced):
    runs = _fit(make, 8, [Counted(), Counted()])
    (_, _, rec0, _), (_, _, rec1, _) = runs
    for step in range(1, 9):
        same = torch.equal(rec0.bn[step - 1], rec1.bn[step - 1])
        assert same == (step in synced), step


def test_a_streamed_sync_that_replaces_the_whole_model_needs_no_evaluation_collective():
    """One fragment, no overlap, merge 1 (low precision makes it the streamed path): after the sync every rank
    holds the anchors, so validation there builds no consensus; with two fragments it must."""
    whole = _fit(lambda: LocalSGDStrategy(period=3, comm_dtype="bfloat16"), 3, [Counted(), Counted()], val_every=3)
    split = _fit(lambda: LocalSGDStrategy(period=3, fragments=3, comm_dtype="bfloat16"), 3, [Counted(), Counted()],
                 val_every=3)
    assert [s.meter.eval_bytes for s, *_ in whole] == [0, 0]
    assert all(s.meter.eval_bytes > 0 for s, *_ in split)


def test_validation_mid_period_sees_the_consensus_and_training_resumes_from_the_local_weights():
    """τ = 4, validation after steps 3 and 6 (neither a sync): both ranks validate the mean of their weights and
    BN statistics; the next step starts from each rank's own weights; the consensus traffic is booked as
    ``eval_bytes``, not ``bytes``."""
    runs = _fit(lambda: LocalSGDStrategy(period=4), 7, [Counted(), Counted()], val_every=3)
    for v, step in enumerate((3, 6)):
        local = [rec.params[step - 1] for _, _, rec, _ in runs]
        bn = [rec.bn[step - 1] for _, _, rec, _ in runs]
        assert not torch.equal(local[0], local[1])
        for r, (strategy, model, _, _) in enumerate(runs):
            params, mean = model.seen[v]
            torch.testing.assert_close(params, (local[0] + local[1]) / 2, atol=1e-7, rtol=0)
            torch.testing.assert_close(mean, (bn[0] + bn[1]) / 2, atol=1e-7, rtol=0)
            assert torch.equal(model.starts[step], local[r])
            assert strategy.meter.eval_bytes > 0


def test_easgd_validates_the_centre_with_the_mean_statistics():
    """EASGD, τ = 4, validation after step 3 (before any elastic step): the parameters are the centre (still x₀),
    the BN statistics the ranks' mean."""
    x0 = flat_params(Counted())
    runs = _fit(lambda: EASGDStrategy(period=4, beta=0.43), 4, [Counted(), Counted()], val_every=3)
    bn = [rec.bn[2] for _, _, rec, _ in runs]
    for _, model, rec, _ in runs:
        params, mean = model.seen[0]
        torch.testing.assert_close(params, x0, atol=0, rtol=0)
        torch.testing.assert_close(mean, (bn[0] + bn[1]) / 2, atol=1e-7, rtol=0)
        assert not torch.equal(rec.params[2], x0)  # training went on from the local weights


def test_validation_right_after_a_sync_needs_no_collective():
    """Nor does the sanity check before the first step: every rank starts from rank 0's weights."""
    runs = _fit(lambda: LocalSGDStrategy(period=3), 6, [Counted(), Counted()], val_every=3, sanity=1)
    for strategy, model, rec, _ in runs:
        assert strategy.meter.eval_bytes == 0 and len(model.seen) == 3
        assert torch.equal(model.seen[1][0], rec.params[2])


class PoisonAfterStep2(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 2:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


def test_a_non_finite_rank_at_an_evaluation_consensus_raises_on_every_rank():
    with pytest.raises(RankError) as info:
        _fit(lambda: LocalSGDStrategy(period=4), 4, [Counted(), Counted()], val_every=3,
             callbacks=[PoisonAfterStep2()])
    for exc in info.value.errors:
        assert isinstance(exc, NonFiniteError) and str(exc).startswith(
            "non-finite weights on rank(s) [1] at optimizer step 3;"), exc


def test_drop_warns_the_bad_rank_only_naming_what_it_lost():
    """Weights and the BN statistics they poisoned: excluded and reset, optimizer state cleared; the healthy rank
    says nothing."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = _fit(lambda: LocalSGDStrategy(period=4, nonfinite="drop"), 4, [Counted(), Counted()],
                    callbacks=[PoisonAfterStep2()])
    mine = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert mine == [f"rank 1: non-finite {what} at optimizer step 4; excluded from the average and reset to the "
                    "consensus (its optimizer state is cleared)" for what in ("parameters", "buffers")]
    (_, m0, _, t0), (_, m1, _, t1) = runs
    assert t1.optimizers[0].state == {} and len(t0.optimizers[0].state) > 0
    assert torch.equal(flat_params(m0), flat_params(m1))


def test_each_optimizer_syncs_on_its_own_step_count():
    """τ = 2 over 8 batches (12 optimizer steps, Lightning's global step): the first optimizer steps 8 times
    (syncs after its steps 2, 4, 6, 8), the second 4 times (after its steps 2 and 4, i.e. batches 4 and 8)."""
    runs = _fit(lambda: recording(LocalSGDStrategy)(period=2), 12, [TwoOptimizers(), TwoOptimizers()])
    for strategy, *_ in runs:
        assert strategy.sync_ids == [0, 0, 1, 0, 0, 1]
        assert strategy.clock.steps == {0: 8, 1: 4}


def test_strategy_figures_are_logged_but_stay_out_of_callback_metrics():
    """They differ between ranks (``sync_seconds``), and ``callback_metrics`` must agree across ranks. EASGD logs
    the norm of its last centre step at each sync (τ = 2: after steps 2 and 4)."""
    runs = _fit(lambda: EASGDStrategy(period=2, beta=0.43), 4, [Counted(), Counted()], logger=True)
    strategy, _, _, trainer = runs[0]
    norms = trainer.logger.values("easgd/center_step_norm")
    assert len(norms) == 2 and norms[-1] == pytest.approx(strategy.last_center_step_norm) and norms[0] != norms[1]
    assert trainer.logger.values("comm/syncs")[-1] == 2.0
    for _, _, _, trainer in runs:
        assert not [k for k in trainer.callback_metrics if k.startswith(("comm/", "easgd/"))]


def test_sparse_gradients_are_refused_where_gradients_are_averaged():
    """Warm-up steps (even one) and Lookahead sync mode average gradients: a sparse embedding fails at setup,
    naming the module; without warm-up, Local SGD averages its (dense) weights and trains."""
    message = ("{}: sparse gradients (nn.Embedding(sparse=True) in ['emb']) cannot be averaged on the DDP-like steps "
               "(warmup_steps > 0, Lookahead mode='sync'); use sparse=False, or warmup_steps=0 with a strategy that "
               "averages parameters (Local SGD, Lookahead mode='local', LSGD, EASGD)")
    for make, name in ((lambda: LocalSGDStrategy(period=2, warmup_steps=1), "LocalSGDStrategy"),
                       (lambda: LookaheadStrategy(period=2), "LookaheadStrategy")):
        with pytest.raises(RankError) as info:
            _fit(make, 2, [Sparse(), Sparse()])
        assert [str(e) for e in info.value.errors] == [message.format(name)] * 2
    _fit(lambda: LocalSGDStrategy(period=2), 2, [Sparse(), Sparse()])


class Sparse(TinyModel):
    def __init__(self) -> None:
        super().__init__(bn=False)
        self.emb = torch.nn.Embedding(4, 6, sparse=True)

    def forward(self, x):
        return self.net(x + self.emb.weight[0])


def test_a_second_fit_follows_a_buffer_replaced_between_fits():
    """The buffers broadcast from rank 0 after every averaged step are listed once per fit (as DDP lists them), and
    again in the next fit: a buffer *replaced* by a new tensor between two fits of one trainer is followed. Each
    step adds rank + 1 to ``count``; with the broadcast, both ranks end a fit holding rank 0's count."""
    models = [Counted() for _ in range(2)]

    def body(rank: int) -> list[list[int]]:
        model = models[rank]
        trainer = threaded_trainer(2, rank, LocalSGDStrategy(period=4, warmup_steps=100), 3, [],
                                   limit_val_batches=0)
        trainer.fit(model)
        first = model.count.tolist()
        model.count = torch.zeros(2, dtype=torch.int64)  # a new tensor object under the same name
        trainer.fit_loop.epoch_loop.max_steps = 6
        trainer.fit(model)
        return [first, model.count.tolist()]

    for first, second in run_threaded(2, body):
        assert first == [3, 3] and second == [3, 3]  # rank 0's three steps, on both ranks
