"""Issue 24: every rank sees the same thing, at Lightning's step, with the Lightning features users add
(2 gloo processes, one launch: ``tests/scripts/every_rank.py``)."""

import math

import pytest
import torch
from dist import run_ranks

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("every_rank")
    run_ranks("every_rank.py", out, timeout=380)  # a rank-asymmetric metric would hang: the timeout fails it
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)], out


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def test_every_published_value_is_the_same_on_every_rank_at_every_step(ranks):
    (r0, r1), _ = ranks
    rows0, rows1 = r0["publish"]["rows"], r1["publish"]["rows"]
    assert [r["step"] for r in rows0] == list(range(1, 13))
    for a, b in zip(rows0, rows1, strict=True):
        assert _same(a, b), (a["step"], a, b)
    last = rows0[-1]
    for key in ("noise/norm", "noise/tail_alpha_hill", "curvature/lambda_max", "grad/norm", "time_avg/train/loss"):
        assert key in last["metrics"], key
    assert set(last["bar"]) == {"noise", "lmax", "gnorm", "avg"}  # the progress bar shows them on every rank
    assert last["curvature_attr"]["step"] == 12  # what CurvatureAdaptivePeriod reads


def test_checkpoint_and_early_stopping_monitor_our_metrics_on_every_rank(ranks):
    (r0, r1), out = ranks
    for name, (score, path) in r0["publish"]["best"].items():
        assert score is not None and math.isfinite(score), name
        assert r1["publish"]["best"][name] == (score, path), name  # both ranks agree on the best checkpoint
        assert (out / f"ck_{name}" / path).exists(), name
    assert r0["publish"]["stoppers"] == r1["publish"]["stoppers"]
    assert all(math.isfinite(best) for best, _ in r0["publish"]["stoppers"].values())


def test_comm_metrics_land_at_lightnings_steps_warmup_included(ranks):
    (r0, _), _ = ranks
    logged = r0["publish"]["logged"]
    assert logged["train/loss"] == [4, 9]  # Lightning: batch index k, when (k + 1) % log_every_n_steps == 0
    assert logged["comm/bytes"] == logged["comm/syncs"] == [4, 9]  # step 4 is inside the 6 warm-up steps
    assert logged["curvature/lambda_max"] == [3, 7, 11]  # measured after optimizer steps 4, 8, 12


@pytest.mark.parametrize("name", ["local_sgd", "lsgd", "lookahead_local"])
def test_two_optimizers_all_parameters_agree_after_each_sync(ranks, name):
    (r0, r1), _ = ranks
    a, b = r0["two_opt"][name], r1["two_opt"][name]
    assert a["steps"] == {0: 6, 1: 6}
    # syncs after each optimizer's steps 2, 4, 6, i.e. at the ends of batches 1, 3, 5: both groups agree there
    for batch in (1, 3, 5):
        assert torch.equal(a["params"][batch], b["params"][batch]), batch
    assert not torch.equal(a["params"][0], b["params"][0])  # and they did drift apart in between
    n = a["n_first"]
    assert not torch.equal(a["params"][0][n:], b["params"][0][n:])  # the second optimizer's parameters too


def test_lsgd_pulls_every_optimizers_parameters_toward_one_leader(ranks):
    (r0, r1), _ = ranks
    a, b = r0["two_opt"]["lsgd"], r1["two_opt"]["lsgd"]
    # one sync per period, not one per optimizer: after the last optimizer's step, so the batch ends pulled
    assert a["sync_ids"] == [1, 1, 1] and a["syncs"] == 3
    assert a["leaders"] == [0, 0, 0]  # rank 1's loss carries a +0.1 offset
    for i in range(3):
        torch.testing.assert_close(b["post"][i], a["pre"][i], atol=0, rtol=0)  # λ = 1: all of x copied


def test_easgd_pulls_each_optimizers_parameters_elastically(ranks):
    (r0, r1), _ = ranks
    a, b = r0["two_opt"]["easgd"], r1["two_opt"]["easgd"]
    n, alpha = a["n_first"], 0.6 / 2  # α = β / N
    assert a["sync_ids"] == [0, 1, 0, 1, 0, 1]
    for i, idx in enumerate(a["sync_ids"]):
        part = slice(0, n) if idx == 0 else slice(n, None)
        gap_pre = a["pre"][i][part] - b["pre"][i][part]
        gap_post = a["post"][i][part] - b["post"][i][part]
        assert gap_pre.abs().max() > 0
        # x_i − x̃ shrinks by (1 − α) for every worker, so the gap between two workers does too
        torch.testing.assert_close(gap_post, (1 - alpha) * gap_pre, atol=1e-6, rtol=1e-5)


def test_world_size_dependent_arguments_fail_at_setup(ranks):
    (r0, r1), _ = ranks
    for r in (r0, r1):
        error = r["late"]["error"]
        assert error is not None and "invalid group_size=3; expected a divisor of the world size (2 processes)" in error
        assert r["late"]["steps_run"] == 0
