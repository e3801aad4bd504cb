"""Streaming DiLoCo (Douillard et al. 2025) in LocalSGDStrategy / Lookahead ``mode="local"``, in process: the
fragment plan and the low-precision encodings by value, and whole threaded fits on 2 ranks against the float64
reference ``reference.streaming_diloco`` (written from the paper's equations, no package code in it). Asymmetric
settings throughout (merge 0.6, outer lr 0.7, outer momentum 0.6). The gloo path (async all-reduce / all-gather on
real processes) is in ``test_streaming_gloo.py``.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from reference import streaming_diloco
from scripts._common import Recorder, TinyModel, flat_params, pl
from scripts._common import trainer as scripts_trainer
from threaded import RankError, ThreadRank, run_threaded, trainer

from lightning_opt.callbacks import AutoResume
from lightning_opt.distributed.outer_reduce import QUANT_BLOCK, InFlight, decode, encode
from lightning_opt.strategies import LocalSGDStrategy, LookaheadStrategy
from lightning_opt.strategies._streaming import FragmentStream, offsets, partition, views
from lightning_opt.strategies.errors import NonFiniteError

pytestmark = pytest.mark.timeout(120)

# TinyModel(bn=False): Linear(6, 16) weight 96 values, bias 16, Linear(16, 1) weight 16, bias 1; float32
NUMELS, FP32 = [96, 16, 16, 1], [4, 4, 4, 4]
STEPS = 12


# ---------------------------------------------------------------------------------------------- the plan
def test_partition_cuts_equal_bytes_inside_a_layer_where_needed():
    assert partition(NUMELS, FP32, 1) == [[(0, 0, 96), (1, 0, 16), (2, 0, 16), (3, 0, 1)]]
    assert partition(NUMELS, FP32, 2) == [[(0, 0, 64)], [(0, 64, 96), (1, 0, 16), (2, 0, 16), (3, 0, 1)]]
    assert partition(NUMELS, FP32, 3) == [[(0, 0, 43)], [(0, 43, 86)], [(0, 86, 96), (1, 0, 16), (2, 0, 16),
                                                                        (3, 0, 1)]]
    # bytes, not elements: a float64 tensor counts twice; 1/2 of 48 B falls 2 values into the second tensor
    assert partition([4, 4], [8, 4], 2) == [[(0, 0, 3)], [(0, 3, 4), (1, 0, 4)]]
    assert partition([4, 4], [4, 8], 2) == [[(0, 0, 4), (1, 0, 1)], [(1, 1, 4)]]
    # a parameter that is not one contiguous run is never cut: the cut moves to its end
    assert partition(NUMELS, FP32, 2, atomic=frozenset({0})) == [[(0, 0, 96)], [(1, 0, 16), (2, 0, 16), (3, 0, 1)]]
    with pytest.raises(ValueError, match="fragments"):
        partition([2, 1], FP32[:2], 4)
    # cuts that would fall on one element are spread so that no fragment is empty, from either end
    assert partition([1, 1, 1, 1], [8, 1, 1, 1], 4) == [[(0, 0, 1)], [(1, 0, 1)], [(2, 0, 1)], [(3, 0, 1)]]
    assert partition([1, 1, 1, 1], [1, 1, 1, 8], 4) == [[(0, 0, 1)], [(1, 0, 1)], [(2, 0, 1)], [(3, 0, 1)]]
    assert partition([3, 1], [8, 1], 3) == [[(0, 0, 1)], [(0, 1, 2)], [(0, 2, 3), (1, 0, 1)]]


@pytest.mark.parametrize("seed", range(20))
def test_partition_covers_every_element_once_in_order_with_equal_bytes(seed):
    rng = np.random.default_rng(seed)
    numels = [int(s) for s in rng.integers(1, 1000, size=int(rng.integers(1, 12)))]
    sizes = [int(s) for s in rng.choice([2, 4, 8], size=len(numels))]
    total = sum(n * e for n, e in zip(numels, sizes))
    for fragments in (1, 2, 3, 5, 8):
        parts = partition(numels, sizes, fragments)
        assert len(parts) == fragments and all(parts)
        pieces = [piece for part in parts for piece in part]
        covered = {}
        for i, lo, hi in pieces:
            assert 0 <= lo < hi <= numels[i] and covered.get(i, 0) == lo  # in order, no gap, no overlap
            covered[i] = hi
        assert covered == dict(enumerate(numels))
        for part in parts:  # within one element of an equal share
            assert abs(sum((hi - lo) * sizes[i] for i, lo, hi in part) - total / fragments) <= 2 * max(sizes)


def test_offsets_put_the_last_fragment_on_the_period_end():
    assert offsets(8, 4) == [2, 4, 6, 8]
    assert offsets(10, 4) == [4, 6, 8, 10]
    assert offsets(5, 1) == [5]
    assert offsets(3, 3) == [1, 2, 3]


def test_which_fragment_syncs_at_which_step_and_the_steps_to_the_next():
    stream = FragmentStream(period=8, fragments=4, overlap_steps=2, merge_mix=0.5, comm_dtype="float32",
                            outer=torch.optim.SGD, meter=None, on_dropped=None)
    assert [stream.due(s) for s in range(1, 19)] == [
        [], [0], [], [1], [], [2], [], [3], [], [0], [], [1], [], [2], [], [3], [], [0]]
    assert [stream.steps_to_next(s) for s in range(0, 10)] == [2, 1, 2, 1, 2, 1, 2, 1, 2, 1]
    uneven = FragmentStream(period=10, fragments=4, overlap_steps=0, merge_mix=1.0, comm_dtype="float32",
                            outer=torch.optim.SGD, meter=None, on_dropped=None)  # syncs after steps 4, 6, 8, 10
    assert [uneven.steps_to_next(s) for s in range(0, 12)] == [4, 3, 2, 1, 2, 1, 2, 1, 2, 1, 4, 3]


def test_views_write_into_the_tensors():
    a, b = torch.zeros(2, 3), torch.zeros(4)
    pieces = views([a, b], [(0, 4, 6), (1, 0, 4)])
    assert [p.shape for p in pieces] == [(2,), (4,)]
    for p in pieces:
        p.fill_(1.0)
    assert a.view(-1).tolist() == [0, 0, 0, 0, 1, 1] and b.tolist() == [1, 1, 1, 1]


# ---------------------------------------------------------------------------------------------- the encodings
def _int8_reference(x: np.ndarray) -> np.ndarray:
    """Round to nearest of 127 levels per block of QUANT_BLOCK, scale = the block's largest magnitude / 127."""
    out = np.empty_like(x)
    for start in range(0, x.size, QUANT_BLOCK):
        block = x[start:start + QUANT_BLOCK]
        scale = np.float32(np.abs(block).max() / np.float32(127)) or np.float32(1)
        out[start:start + QUANT_BLOCK] = np.clip(np.round(block / scale), -127, 127) * scale
    return out


def test_int8_rounds_each_block_to_its_own_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * QUANT_BLOCK + 5, generator=g) * torch.tensor([1e-3] * QUANT_BLOCK + [10.0] * (QUANT_BLOCK + 5))
    payload, scales = encode(x, "int8")
    assert payload.dtype == torch.int8 and scales.shape == (3,)
    np.testing.assert_allclose(decode(payload, scales, "int8").numpy(), _int8_reference(x.numpy()), rtol=1e-6, atol=0)
    # the small block keeps its precision: its error is a fraction of its own scale, not the large blocks'
    err = (decode(payload, scales, "int8") - x).abs()
    assert err[:QUANT_BLOCK].max() <= 0.5 * x[:QUANT_BLOCK].abs().max() / 127 * 1.0001


def test_float16_is_scaled_and_bfloat16_is_a_plain_cast():
    for x in (torch.tensor([1e6, -3e5, 0.0]), torch.tensor([1e-9, -3e-10])):  # over float16's range; below it
        payload, scales = encode(x, "float16")
        assert payload.dtype == torch.float16 and torch.equal(scales, x.abs().max().reshape(1))
        torch.testing.assert_close(decode(payload, scales, "float16"), x, rtol=1e-3, atol=0)
        assert not torch.isfinite(x.half()).all() or (x.half().float() - x).abs().max() > 1e-3 * x.abs().max()
    payload, scales = encode(x, "bfloat16")
    assert scales.numel() == 0 and torch.equal(decode(payload, scales, "bfloat16"), x.to(torch.bfloat16).float())
    zeros, scale = encode(torch.zeros(7), "int8")
    assert torch.equal(scale, torch.ones(1)) and torch.equal(decode(zeros, scale, "int8"), torch.zeros(7))


@pytest.mark.parametrize("comm_dtype,per_value", [("float32", 4), ("bfloat16", 2), ("float16", 2), ("int8", 1)])
def test_one_rank_sends_its_encoded_payload_and_flags(comm_dtype, per_value):
    from lightning_opt.distributed import CommMeter

    meter = CommMeter()
    arrived = InFlight(torch.linspace(-1, 1, QUANT_BLOCK + 1), comm_dtype, meter).wait()
    scales = 2 if comm_dtype in ("int8", "float16") else 0
    assert meter.bytes == (QUANT_BLOCK + 1) * per_value + 4 * (scales + 1)
    assert arrived.bad == [] and not arrived.local_bad
    bad = InFlight(torch.tensor([1.0, float("nan")]), comm_dtype).wait()
    assert bad.bad == [0] and bad.local_bad and torch.equal(bad.total, torch.zeros(2))


# ---------------------------------------------------------------------------------------------- whole fits
def _fit(make_strategy, steps: int = STEPS, run_dir=None, world: int = 2) -> list[torch.Tensor]:
    """Each rank's flat weights after every optimizer step of TinyModel(bn=False, SGD momentum 0.9); with
    ``run_dir``, an AutoResume there checkpointing after every 3rd (fragment) sync."""
    models = [TinyModel(bn=False, momentum=0.9) for _ in range(world)]

    def rank_fn(rank: int):
        rec, strategy = Recorder(), make_strategy()
        if run_dir is None:
            trainer(world, rank, strategy, steps, [rec]).fit(models[rank])
        else:
            strategy.cluster_environment = ThreadRank(rank, world)
            scripts_trainer(strategy, max_steps=steps, devices=world, enable_checkpointing=True,
                            callbacks=[rec, AutoResume(run_dir, every_n_syncs=3)]).fit(models[rank])
        return torch.stack(rec.params).double()

    return run_threaded(world, rank_fn)


HALVES = [(0, 64), (64, 129)]  # the 129 values cut at 258 of 516 bytes
CASES = {
    # fragments, period, overlap, merge, outer: (name, lr, momentum, nesterov) -> the reference's parts, offsets
    "p2-d1-diloco": (2, 4, 1, 0.6, ("sgd", 0.7, 0.6, True), HALVES, [2, 4]),
    "p1-d2-plain": (1, 4, 2, 1.0, ("sgd", 1.0, 0.0, False), [(0, 129)], [4]),
    "p3-d0-slowmo": (3, 6, 0, 0.8, ("sgd", 1.0, 0.6, False), [(0, 43), (43, 86), (86, 129)], [2, 4, 6]),
    "p2-d3-adam": (2, 4, 3, 0.6, ("adam", 0.01, 0.0, False), HALVES, [2, 4]),
}


def _strategy(fragments, period, overlap, merge, outer, **kw):
    name, lr, mu, nesterov = outer
    if name == "adam":
        kw["outer_optimizer"] = functools.partial(torch.optim.Adam, lr=lr)
    else:
        kw.update(outer_lr=lr, outer_momentum=mu, outer_nesterov=nesterov)
    return LocalSGDStrategy(period=period, fragments=fragments, overlap_steps=overlap, merge_mix=merge, **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_fit_follows_the_reference(case):
    fragments, period, overlap, merge, outer, parts, offs = CASES[case]
    ours = _fit(lambda: _strategy(fragments, period, overlap, merge, outer))
    name, lr, mu, nesterov = outer
    ref = streaming_diloco(period, STEPS, parts, offs, overlap, merge, name, lr, mu, nesterov)
    for rank in range(2):
        torch.testing.assert_close(ours[rank], ref[rank], atol=3e-6, rtol=1e-5)
    assert not torch.allclose(ours[0][-1], ours[1][-1])  # the ranks hold their own weights between syncs


@pytest.mark.parametrize("steps", [2, 6])
def test_fit_flushes_what_is_in_flight_into_the_consensus_it_hands_back(steps):
    """P = 2, τ = 4, d = 1: fragment 0 is sent after step 2 (its first send) or 6 and has not arrived when fit
    ends; fit still hands back the anchors with its outer step applied (no merge), on every rank."""
    fragments, period, overlap, merge, outer, parts, offs = CASES["p2-d1-diloco"]
    models = [TinyModel(bn=False, momentum=0.9) for _ in range(2)]
    run_threaded(2, lambda rank: trainer(2, rank, _strategy(fragments, period, overlap, merge, outer), steps,
                                         []).fit(models[rank]))
    anchors: list[torch.Tensor] = []
    streaming_diloco(period, steps, parts, offs, overlap, merge, "sgd", 0.7, 0.6, True, anchors=anchors)
    for model in models:
        torch.testing.assert_close(flat_params(model).double(), anchors[0], atol=3e-6, rtol=1e-5)


def test_lookahead_local_streams_with_outer_lr_alpha():
    ours = _fit(lambda: LookaheadStrategy(period=4, alpha=0.3, mode="local", fragments=2, overlap_steps=1,
                                          merge_mix=0.6))
    ref = streaming_diloco(4, STEPS, HALVES, [2, 4], 1, 0.6, "sgd", 0.3)
    for rank in range(2):
        torch.testing.assert_close(ours[rank], ref[rank], atol=3e-6, rtol=1e-5)


def test_defaults_take_the_classic_path_bit_for_bit():
    explicit = LocalSGDStrategy(period=3, fragments=1, overlap_steps=0, merge_mix=1.0, comm_dtype="float32")
    assert not explicit.streams
    a = _fit(lambda: LocalSGDStrategy(period=3, fragments=1, overlap_steps=0, comm_dtype="float32"))
    b = _fit(lambda: LocalSGDStrategy(period=3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    classic = "LocalSGDStrategy(period=ConstantPeriod(3), warmup_steps=0, outer_lr=1.0, outer_momentum=0.0, " \
              "outer_nesterov=False"
    assert repr(explicit) == classic + ")"  # the streamed settings are named only where they stream
    assert repr(LocalSGDStrategy(period=3, fragments=2, merge_mix=0.6, comm_dtype="int8")) == (
        classic + ", outer_optimizer=None, fragments=2, overlap_steps=0, merge_mix=0.6, comm_dtype='int8')")


def test_a_torch_outer_optimizer_equals_the_shorthand():
    outer = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.6, nesterov=True)
    ours = _fit(lambda: LocalSGDStrategy(period=3, outer_optimizer=outer))
    shorthand = _fit(lambda: LocalSGDStrategy(period=3, outer_lr=0.7, outer_momentum=0.6, outer_nesterov=True))
    for rank in range(2):
        torch.testing.assert_close(ours[rank], shorthand[rank], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("comm_dtype", ["bfloat16", "float16", "int8"])
def test_low_precision_outer_gradients_leave_every_rank_identical(comm_dtype):
    """One fragment, no overlap, merge 1: after every sync (steps 3, 6, 9, 12) each rank holds the anchor, and the
    anchors are the same bits on every rank; the trajectory stays within the encoding's error of float32's."""
    ours = _fit(lambda: LocalSGDStrategy(period=3, comm_dtype=comm_dtype, outer_lr=0.7))
    exact = _fit(lambda: LocalSGDStrategy(period=3, outer_lr=0.7))
    for step in (2, 5, 8, 11):
        assert torch.equal(ours[0][step], ours[1][step])
        assert not torch.equal(ours[0][step], exact[0][step])  # the encoding did round
    torch.testing.assert_close(ours[0], exact[0], atol=2e-2, rtol=0)


class RecordState(pl.Callback):
    """The number of parameters with optimizer state after every step."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.sizes.append(len(trainer.optimizers[0].state))


class PoisonAfter(pl.Callback):
    """NaN into rank ``rank``'s first weight after optimizer step ``step``."""

    def __init__(self, step: int, rank: int = 1) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


def test_drop_leaves_the_bad_rank_out_of_the_fragment_and_resets_it():
    """Rank 1's first weight is NaN after step 3, so all its weights are after step 4. Fragment 1 (the last 65 of
    the 129 values) sends after step 4 and arrives after step 5 (plain averaging, merge 1): its anchor is rank 0's
    step-4 weights alone, rank 0 takes it, and rank 1 restarts from every fragment's anchor (fragment 0's: the
    average that arrived after step 3) with its optimizer state cleared."""
    records = [RecordState(), RecordState()]
    models = [TinyModel(bn=False, momentum=0.9) for _ in range(2)]

    def rank_fn(rank: int):
        rec = Recorder()
        strategy = LocalSGDStrategy(period=4, fragments=2, overlap_steps=1, nonfinite="drop")
        trainer(2, rank, strategy, 6, [rec, records[rank], PoisonAfter(3)]).fit(models[rank])
        return torch.stack(rec.params).double()

    with pytest.warns(UserWarning, match="fragment 1 after local step 5") as caught:
        r0, r1 = run_threaded(2, rank_fn)
    assert [str(w.message) for w in caught if "outer gradient" in str(w.message)] == [
        "rank 1: non-finite outer gradient of fragment 1 after local step 5; excluded from the average and reset to "
        "the consensus (its optimizer state is cleared)"]
    first, rest = slice(0, 64), slice(64, None)
    assert not torch.isfinite(r1[3]).any()
    # the anchor is rank 0's alone, a − (a − x₀) (÷ 1 healthy rank, not 2), up to its rounding
    torch.testing.assert_close(r0[4, rest], r0[3, rest], atol=1e-7, rtol=0)
    torch.testing.assert_close(r1[4, rest], r0[4, rest], atol=0, rtol=0)
    torch.testing.assert_close(r1[4, first], r0[2, first], atol=0, rtol=0)  # fragment 0's anchor
    assert torch.isfinite(r1[5]).all()
    assert records[1].sizes[4] == 0 and records[0].sizes[4] == 4


@pytest.mark.parametrize("comm_dtype,bad_rank,overlap", [("float32", 1, 1), ("int8", 0, 1), ("bfloat16", 1, 1),
                                                        ("float32", 1, 0)])
def test_raise_stops_every_rank_when_the_fragment_arrives(comm_dtype, bad_rank, overlap):
    """Fragment 0 is sent after local step 2 and arrives d steps later (d = 0: at once)."""
    def rank_fn(rank: int):
        strategy = LocalSGDStrategy(period=4, fragments=2, overlap_steps=overlap, comm_dtype=comm_dtype)
        trainer(2, rank, strategy, 8, [PoisonAfter(1, bad_rank)]).fit(TinyModel(bn=False))

    with pytest.raises(RankError) as info:
        run_threaded(2, rank_fn)
    errors = info.value.errors
    assert all(isinstance(e, NonFiniteError) for e in errors), errors
    assert {str(e) for e in errors} == {
        f"non-finite outer gradient of fragment 0 on rank(s) [{bad_rank}] (arriving after local step {2 + overlap}); "
        "refusing to use it on any rank (nothing was written). Pass nonfinite='drop' to leave such ranks out and "
        "reset them."}


def test_drop_without_overlap_resets_the_bad_rank_at_once():
    """d = 0: fragment 0 (sent after step 2) arrives at once; rank 1, NaN since step 1, is reset to the anchors
    right there and trains on with finite weights."""
    def rank_fn(rank: int):
        rec = Recorder()
        strategy = LocalSGDStrategy(period=4, fragments=2, nonfinite="drop", merge_mix=0.6)
        trainer(2, rank, strategy, 4, [PoisonAfter(1), rec]).fit(TinyModel(bn=False))
        return torch.stack(rec.params)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, r1 = run_threaded(2, rank_fn)
    assert [str(w.message) for w in caught if "outer gradient" in str(w.message)] == [
        "rank 1: non-finite outer gradient of fragment 0 after local step 2; excluded from the average and reset to "
        "the consensus (its optimizer state is cleared)"]
    assert not torch.isfinite(r1[0]).all() and torch.isfinite(r1[1:]).all()


def test_resume_with_a_fragment_in_flight_equals_the_uninterrupted_run(tmp_path):
    """Period 4, 2 fragments, overlap 1: fragment 0 sends after step 6 and arrives after step 7. AutoResume
    checkpoints after every 3rd fragment sync (step 6, an epoch end), so the checkpoint holds fragment 0 in
    flight; the resumed run applies it after step 7 as the uninterrupted one does."""
    def make():
        return LocalSGDStrategy(period=4, fragments=2, overlap_steps=1, merge_mix=0.6, comm_dtype="int8",
                                outer_lr=0.7, outer_momentum=0.6)

    full = _fit(make)
    _fit(make, steps=8, run_dir=tmp_path)
    saved = torch.load(next(tmp_path.glob("*.ckpt")), weights_only=False)["lightning_opt"]["strategy"]["extra"]
    assert saved["stream"][0]["flying"][0]["at"] == 7  # in flight when saved
    resumed = _fit(make, steps=STEPS, run_dir=tmp_path)
    for rank in range(2):
        assert resumed[rank].shape[0] == STEPS - 6
        torch.testing.assert_close(resumed[rank], full[rank][6:], atol=1e-7, rtol=0)


def test_streamed_metrics_and_the_progress_bar_count():
    strategies = []

    def make():
        strategies.append(LocalSGDStrategy(period=4, fragments=2, overlap_steps=1, comm_dtype="bfloat16"))
        return strategies[-1]

    _fit(make, steps=10)
    stats = strategies[0].comm_stats
    assert stats["comm/syncs"] == 5  # fragment syncs after steps 2, 4, 6, 8, 10
    # fragment 0 = 64 values (3 syncs), fragment 1 = 65 (2 syncs): bfloat16 payload + 2 float32 flags each
    assert stats["comm/peak_bytes_per_sync"] == 65 * 2 + 8
    assert stats["comm/bytes"] == 3 * (64 * 2 + 8) + 2 * (65 * 2 + 8)
    assert stats["comm/overlap_wait_seconds"] >= 0
    assert strategies[0].steps_to_next_sync == 2


def _stream(**kw) -> FragmentStream:
    from lightning_opt.distributed import CommMeter

    args = dict(period=4, fragments=2, overlap_steps=1, merge_mix=0.6, comm_dtype="float32",
                outer=functools.partial(torch.optim.SGD, lr=0.7, momentum=0.6), meter=CommMeter(),
                on_dropped=lambda p, at: None)
    return FragmentStream(**{**args, **kw})


def _train(params: list[torch.Tensor], step: int) -> None:
    for i, p in enumerate(params):  # a deterministic stand-in for an inner step
        p.sub_(0.01 * (step + i) * torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape).cos())


def test_a_restored_stream_applies_the_saved_gradient_at_its_step():
    """Saved after step 2 with fragment 0 in flight (saved twice: the second save sees it arrived), restored into
    fresh anchors: steps 3–9 give the same weights, anchors and outer momentum as the stream that went on."""
    import copy

    params, anchors = [torch.linspace(-1, 1, 6), torch.linspace(0, 2, 5)], []
    anchors = [p.clone() for p in params]
    a = _stream()
    for step in (1, 2):
        _train(params, step)
        a.step(step, params, anchors, "raise")
    assert list(a.flying) == [0]
    a.state_dict()
    state = copy.deepcopy(a.state_dict())
    params_b, anchors_b = [p.clone() for p in params], [x.clone() for x in anchors]
    b = _stream()
    b.load_state_dict(state, rank=0, world=1)
    for step in range(3, 10):
        for ps, ans, stream in ((params, anchors, a), (params_b, anchors_b, b)):
            _train(ps, step)
            stream.step(step, ps, ans, "raise")
    for x, y in zip(params + anchors, params_b + anchors_b):
        assert torch.equal(x, y)
    assert torch.equal(a.state_dict()["outer"][1]["state"][0]["momentum_buffer"],
                       b.state_dict()["outer"][1]["state"][0]["momentum_buffer"])


def test_a_stream_saved_before_its_first_step_restores_and_partitions_at_its_first_step():
    """A checkpoint taken during warm-up holds a stream with no partition yet: restored, it cuts one at its first
    step, as the stream that was never saved does."""
    params = [torch.linspace(-1, 1, 6), torch.linspace(0, 2, 5)]
    anchors = [p.clone() for p in params]
    fresh, restored = _stream(), _stream()
    restored.load_state_dict(fresh.state_dict(), rank=0, world=1)
    assert restored.parts is None and restored.flying == {}
    for stream in (fresh, restored):
        stream.step(1, [p.clone() for p in params], [a.clone() for a in anchors], "raise")
    assert restored.parts == fresh.parts and restored.parts is not None


def test_a_restored_bad_rank_is_reset_only_as_the_same_rank_of_the_same_world():
    state = {"outer": {}, "parts": [[(0, 0, 3)]], "flying": {0: {"at": 5, "total": torch.zeros(3), "bad": [1],
                                                                   "world": 2}}}
    for rank, world, reset in ((1, 2, True), (0, 2, False), (1, 3, False)):
        stream = _stream(fragments=1)
        stream.load_state_dict(state, rank=rank, world=world)
        assert stream.flying[0][1].local_bad is reset and stream.flying[0][0] == 5
        assert stream.parts == [[(0, 0, 3)]]
