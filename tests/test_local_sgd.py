"""LocalSGDStrategy on real 2-process gloo runs (see tests/dist.py for the recipe)."""

import pytest
import torch
from dist import run_ranks
from reference import local_sgd_outer

from lightning_opt.strategies import ConstantHorizon, ConstantPeriod

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def basic(tmp_path_factory):
    out = tmp_path_factory.mktemp("basic")
    run_ranks("local_sgd_basic.py", out, timeout=300)
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def _max_diff(a, b):
    return (a - b).abs().max().item()


def test_period_one_reproduces_ddp(basic):
    r0, r1 = basic
    torch.testing.assert_close(r0["tau1"]["params"], r0["ddp"]["params"], atol=1e-6, rtol=0)
    torch.testing.assert_close(r1["tau1"]["params"], r0["ddp"]["params"], atol=1e-6, rtol=0)


def test_warmup_is_ddp_then_local_steps_then_equal_after_sync(basic):
    p0, p1 = basic[0]["tau4_warm3"]["params"], basic[1]["tau4_warm3"]["params"]
    ddp = basic[0]["ddp"]["params"]
    for i in range(3):  # warmup steps 1..3: DDP-equivalent
        assert _max_diff(p0[i], p1[i]) == 0
        torch.testing.assert_close(p0[i], ddp[i], atol=1e-6, rtol=0)
    # local steps 4..12: the ranks drift apart (different shards) and agree only right after the syncs at steps
    # warmup + τ = 7 and warmup + 2τ = 11
    agree = [step for step in range(4, 13) if _max_diff(p0[step - 1], p1[step - 1]) == 0]
    assert agree == [7, 11]


def test_float_buffers_averaged_at_sync_only_when_enabled(basic):
    b0, b1 = basic[0]["tau4_warm3"]["bn"], basic[1]["tau4_warm3"]["bn"]
    assert _max_diff(b0[6], b1[6]) == 0 and _max_diff(b0[4], b1[4]) > 0
    n0, n1 = basic[0]["tau4_nobuf"]["bn"], basic[1]["tau4_nobuf"]["bn"]
    p0, p1 = basic[0]["tau4_nobuf"]["params"], basic[1]["tau4_nobuf"]["params"]
    assert _max_diff(p0[3], p1[3]) == 0 and _max_diff(n0[3], n1[3]) > 0


def test_outer_optimizer_matches_hand_written_reference(basic):
    """DiLoCo's outer step (outer lr 0.7, Nesterov momentum 0.9) on two workers' mean, step by step."""
    refs = local_sgd_outer(0.7, 0.9, True, k=3, steps=12, world=2, inner_mu=0.0)
    for r, ref in zip(basic, refs):
        torch.testing.assert_close(r["outer"]["params"].double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["outer"]["final"].double(), ref[-1], atol=1e-5, rtol=1e-5)


def test_bytes_per_step_are_ddp_over_period(basic):
    comm = basic[0]["tau4_nobuf"]["comm"]
    # 3 syncs in 12 steps; each moves the parameters once plus a few bytes of flags and the integer BN counter
    ratio = comm["comm/bytes"] / (comm["comm/ddp_bytes"] / 4)
    assert 1.0 <= ratio < 1.05, ratio
    assert comm["comm/syncs"] == 3 and comm["comm/eval_bytes"] == 0  # in sync at the end: no consensus traffic


def test_constant_horizon_stretches_period_when_lr_drops(basic):
    h = basic[0]["horizon"]
    p0, p1 = h["params"], basic[1]["horizon"]["params"]
    syncs = [i + 1 for i in range(len(p0)) if _max_diff(p0[i], p1[i]) == 0]
    # lr 0.1 → horizon 0.4 gives τ=4; the StepLR drop to 0.02 after step 8 gives τ=20 at the sync after step 8
    assert syncs == [4, 8, 12, 32]
    assert h["period"] == 500  # lr 0.1 * 0.2**3 at step 32
    # bytes per optimizer step: parameters once per sync (plus buffers/flags) vs DDP's gradients every step
    assert h["bytes"] < h["ddp_bytes"] / 5


@pytest.mark.parametrize("opt,mode", [("sgd", "plain"), ("adam", "plain"), ("sgd", "outer")])
def test_resume_mid_period_is_exact(tmp_path, opt, mode):
    run_ranks("local_sgd_resume.py", tmp_path, opt, mode, timeout=300)
    for r in (0, 1):
        d = torch.load(tmp_path / f"rank{r}.pt")
        assert d["resumed"].shape[0] == 12 and d["full"].shape[0] == 18
        torch.testing.assert_close(d["resumed"], d["full"][6:], atol=1e-6, rtol=0)
        torch.testing.assert_close(d["res_final"], d["full_final"], atol=1e-6, rtol=0)


def test_nonfinite_raise_names_rank_and_step(tmp_path):
    run_ranks("local_sgd_nan.py", tmp_path, "raise", timeout=200)
    for r in (0, 1):
        d = torch.load(tmp_path / f"rank{r}.pt")
        assert "rank(s) [1]" in d["error"] and "step 8" in d["error"]
        assert torch.isfinite(d["params"][:5]).all()  # poisoned after step 6


def test_nonfinite_drop_resets_rank_to_consensus(tmp_path):
    run_ranks("local_sgd_nan.py", tmp_path, "drop", timeout=200)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert a["error"] is None and torch.isfinite(a["params"]).all()
    assert not torch.isfinite(b["params"][6]).all()  # rank 1 was poisoned after step 6 ...
    assert torch.equal(a["params"][7], b["params"][7])  # ... and reset to rank 0's weights at the sync
    assert torch.isfinite(b["params"][-1]).all()


def test_schedules_compute_the_period():
    assert ConstantPeriod(3).next_period(10, 0.1) == 3
    assert ConstantHorizon(0.4).next_period(0, 0.1) == 4
    assert ConstantHorizon(0.4).next_period(0, 0.02) == 20
    assert ConstantHorizon(1.0, max_period=7).next_period(0, 1e-9) == 7


def test_gradient_accumulation_manual_optimisation_and_two_optimizers(tmp_path):
    run_ranks("local_sgd_modes.py", tmp_path, timeout=300)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    acc = r0["accum"]
    assert acc["steps"] == {0: 4} and acc["syncs"] == 2
    equal = [torch.equal(a, b) for a, b in zip(acc["params"], r1["accum"]["params"])]
    # per batch: equal until the first step (batch 2), synced after batches 4 and 8 and unchanged after batch 5
    assert equal == [True, False, False, True, True, False, False, True]
    man = r0["manual"]
    assert man["steps"] == {0: 6, 1: 3}  # 6 batches: A stepped 6 times, B 3 times
    assert man["syncs"] == 3 + 1  # A after its steps 2, 4, 6; B after its step 2
    n = man["n_first"]
    a0, a1 = man["params"][:, :n], r1["manual"]["params"][:, :n]
    assert [torch.equal(x, y) for x, y in zip(a0, a1)] == [False, True, False, True, False, True]


def test_spawn_variant_runs_and_syncs(tmp_path):
    from dist import run_script

    run_script("local_sgd_spawn.py", tmp_path, timeout=300)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == 2 and r0["syncs"] == 2
    torch.testing.assert_close(r0["params"], r1["params"])  # after the final sync (step 6) ranks agree


def test_curvature_adaptive_period_follows_published_lambda_min(tmp_path):
    run_ranks("curvature_period.py", tmp_path, timeout=300)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["log"] == r1["log"]  # every rank chooses the same period
    first_step, first_period, first_info = r0["log"][0]
    assert first_step == 0 and first_period == 2 and first_info is None  # default before any measurement
    measured = [(p, info) for _, p, info in r0["log"][1:] if info is not None]
    assert measured, "SharpnessMonitor never published a curvature"
    for period, info in measured:
        l_minus = max(0.0, -info["lambda_min"])
        expected = 40 if l_minus == 0 else min(40, max(1, int(0.5 / (0.05 * l_minus))))
        assert period == expected
