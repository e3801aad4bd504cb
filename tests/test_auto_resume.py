"""AutoResume in process: the run directory's files (atomic names, the newest complete checkpoint, retention, the
progress record), a restart that resumes by itself and ends on the uninterrupted run's weights on every rank, the
fault/* figures, and a crash while a checkpoint is written. Two ranks run as threads (tests/threaded.py); the
torchrun restarts with killed processes are in tests/test_elastic.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from scripts._common import CaptureLogger, TinyModel, flat_params, pl
from scripts._common import trainer as scripts_trainer
from threaded import ThreadRank, run_threaded

from lightning_opt.callbacks import AutoResume
from lightning_opt.callbacks import _run_directory as files
from lightning_opt.strategies import LocalSGDStrategy

pytestmark = pytest.mark.timeout(120)


def _save(path, value: float) -> None:
    torch.save({"w": torch.full((64,), value)}, path)


def test_newest_complete_checkpoint_skips_a_file_cut_short_and_temporaries(tmp_path):
    for step in (3, 6, 9):
        _save(files.checkpoint_path(tmp_path, step), step)
    cut = files.checkpoint_path(tmp_path, 9)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    _save(files.temporary(files.checkpoint_path(tmp_path, 12)), 12)  # a write that never finished
    (tmp_path / "notes.ckpt").write_text("not ours")
    newest, skipped = files.newest_complete(tmp_path)
    assert newest == files.checkpoint_path(tmp_path, 6) and skipped == [cut]
    assert [step for step, _ in files.checkpoints(tmp_path)] == [3, 6, 9]
    assert files.newest_complete(tmp_path / "empty") == (None, [])


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (2, 4, 6, 8):
        _save(files.checkpoint_path(tmp_path, step), step)
    assert files.prune(tmp_path, keep=2) == [files.checkpoint_path(tmp_path, s) for s in (2, 4)]
    assert [step for step, _ in files.checkpoints(tmp_path)] == [6, 8]
    assert files.prune(tmp_path / "empty", keep=1) == []


def test_progress_is_rewritten_in_place_and_read_back(tmp_path):
    progress = files.Progress(tmp_path / "run")
    assert progress.previous() is None
    progress.start(attempt=3, step=40)
    progress.record(3, 1234567)
    progress.record(3, 41)  # shorter number: the fixed width leaves no trace of the longer one
    assert files.Progress(tmp_path / "run").previous() == (3, 41)
    progress.close()


STEPS, PERIOD = 12, 3


def _fit_ranks(run_dir, max_steps: int, *, logger=None, plugins=(), every_n_syncs: int = 2, world: int = 2):
    """Local SGD with outer momentum on ``world`` threaded ranks and an AutoResume on ``run_dir``; each rank's
    final weights (the local weights: the last step is a sync in every run below, so they are the consensus).
    Six batches per rank and epoch, so the checkpoints after steps 6 and 12 are at epoch ends (exact resume with a
    plain DataLoader needs that)."""
    models = [TinyModel(bn=False, momentum=0.9, n=48 * world) for _ in range(world)]

    def rank_fn(rank: int):
        counter = StepsRun()
        strategy = LocalSGDStrategy(period=PERIOD, outer_lr=0.7, outer_momentum=0.6)
        strategy.cluster_environment = ThreadRank(rank, world)
        trainer = scripts_trainer(strategy, max_steps=max_steps, devices=world, enable_checkpointing=True,
                                  callbacks=[AutoResume(run_dir, every_n_syncs=every_n_syncs), counter],
                                  logger=logger if rank == 0 and logger is not None else False,
                                  plugins=list(plugins))
        trainer.fit(models[rank])
        return flat_params(models[rank]), counter.steps

    return run_threaded(world, rank_fn)


class StepsRun(pl.Callback):
    """The optimizer steps this fit ran (a resumed fit runs only those after its checkpoint)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1


def test_a_restart_resumes_by_itself_and_ends_on_the_uninterrupted_weights(tmp_path):
    full = _fit_ranks(tmp_path / "full", STEPS)
    # first attempt: stops after step 8 (as if killed); checkpoints after every 2nd sync: step 6
    _fit_ranks(tmp_path / "run", 8)
    assert [s for s, _ in files.checkpoints(tmp_path / "run")] == [6]
    logger = CaptureLogger()
    resumed = _fit_ranks(tmp_path / "run", STEPS, logger=logger)
    for rank in range(2):
        assert resumed[rank][1] == STEPS - 6  # it resumed from step 6 rather than starting over
        torch.testing.assert_close(resumed[rank][0], full[rank][0], atol=1e-6, rtol=0)
    assert logger.values("fault/restarts") == [1.0]
    assert logger.values("fault/lost_steps") == [2.0]  # steps 7 and 8 done again
    assert logger.steps_with("fault/checkpoint_seconds") == [11]  # the sync after step 12 (Lightning's step 11)
    assert logger.values("fault/checkpoint_bytes")[0] == files.checkpoint_path(tmp_path / "run", 12).stat().st_size
    assert [s for s, _ in files.checkpoints(tmp_path / "run")] == [6, 12]  # keep=2


class CrashOnSecondWrite(pl.plugins.TorchCheckpointIO):
    """The second checkpoint write stops halfway (as a killed writer would) and raises."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.writes += 1
        if self.writes == 2:
            super().save_checkpoint(checkpoint, path, storage_options)
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 2])
            raise OSError("disk full")
        super().save_checkpoint(checkpoint, path, storage_options)


def test_a_crash_while_writing_leaves_the_previous_checkpoint_newest(tmp_path):
    full = _fit_ranks(tmp_path / "full", STEPS, world=1)
    with pytest.raises(Exception, match="disk full"):
        _fit_ranks(tmp_path / "run", STEPS, world=1, plugins=[CrashOnSecondWrite()])
    # the checkpoint after step 6 was written; the one after step 12 broke off under its temporary name
    assert [s for s, _ in files.checkpoints(tmp_path / "run")] == [6]
    assert files.temporary(files.checkpoint_path(tmp_path / "run", 12)).exists()
    logger = CaptureLogger()
    resumed = _fit_ranks(tmp_path / "run", STEPS, world=1, logger=logger)
    assert resumed[0][1] == STEPS - 6
    torch.testing.assert_close(resumed[0][0], full[0][0], atol=1e-6, rtol=0)
    assert logger.values("fault/lost_steps") == [6.0]  # the first attempt had finished step 12


def test_every_n_steps_is_required_without_periodic_syncs(tmp_path):
    def rank_fn(rank: int):
        trainer = scripts_trainer("auto", max_steps=2, devices=1, enable_checkpointing=True,
                                  callbacks=[AutoResume(tmp_path)])
        trainer.fit(TinyModel(bn=False))

    with pytest.raises(Exception, match="every_n_steps=None; expected an int >= 1 with SingleDeviceStrategy"):
        rank_fn(0)


@pytest.mark.parametrize("before, after", [(4, 2), (2, 4)], ids=["shrink", "grow"])
def test_lsgd_groups_form_again_when_the_world_changes(tmp_path, before, after):
    """Groups of 2 ranks (one or two groups) checkpoint at step 6; the restart has another world size: it warns,
    resumes from the consensus with the sync schedule and step counters carried over, and trains on to step 12."""
    from lightning_opt.strategies import LSGDStrategy

    def fit(world: int, max_steps: int):
        models = [TinyModel(bn=False, momentum=0.5, lr=0.02, n=96) for _ in range(world)]

        def rank_fn(rank: int):
            strategy = LSGDStrategy(period=3, pull=0.25, leader_window=2, group_size=2, global_period=6,
                                    global_pull=0.6)
            strategy.cluster_environment = ThreadRank(rank, world)
            counter = StepsRun()
            trainer = scripts_trainer(strategy, max_steps=max_steps, devices=world, enable_checkpointing=True,
                                      callbacks=[AutoResume(tmp_path, every_n_syncs=1), counter])
            trainer.fit(models[rank])
            return counter.steps, strategy.clock.state_dict()

        return run_threaded(world, rank_fn)

    fit(before, 6)
    with warnings.catch_warnings(record=True) as caught:  # the threads' warnings land here (process-wide)
        warnings.simplefilter("always")
        resumed = fit(after, 12)
    for steps, clock in resumed:
        assert steps == 6
        assert clock["steps"] == {0: 12} and clock["next_sync"] == {0: 15}
    messages = [str(w.message) for w in caught]
    assert any(f"written with world size {before}, resuming with {after}" in m for m in messages), messages


def test_the_outer_optimizer_state_carries_over_a_change_of_world_size(tmp_path):
    """Local SGD's anchor and outer momentum (identical on every rank) are restored whatever the new world size."""
    _fit_ranks(tmp_path, 6)  # 2 ranks, checkpoint after step 6
    saved = torch.load(files.checkpoint_path(tmp_path, 6), weights_only=False)["lightning_opt"]["strategy"]["extra"]

    class AtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            strategy = trainer.strategy
            self.state = {"anchor": [a.clone() for a in strategy._anchor[0]],
                          "momentum": [m.clone() for m in strategy._momentum[0]]}

    def rank_fn(rank: int):
        at_start = AtStart()
        strategy = LocalSGDStrategy(period=PERIOD, outer_lr=0.7, outer_momentum=0.6)
        strategy.cluster_environment = ThreadRank(rank, 1)
        scripts_trainer(strategy, max_steps=9, devices=1, enable_checkpointing=True,
                        callbacks=[AutoResume(tmp_path, every_n_syncs=2), at_start]).fit(
            TinyModel(bn=False, momentum=0.9, n=48))
        return at_start.state

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the world-size warning is checked in the LSGD test above
        [state] = run_threaded(1, rank_fn)
    for key in ("anchor", "momentum"):
        assert len(state[key]) == len(saved[key][0]) == 4
        for got, want in zip(state[key], saved[key][0]):
            torch.testing.assert_close(got, want.to(got.dtype), atol=0, rtol=0)
    assert any(float(m.abs().max()) > 0 for m in state["momentum"])  # a real momentum, not a fresh zero
