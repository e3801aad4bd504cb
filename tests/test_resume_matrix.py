"""Resume matrix (issue 13): every strategy × {SGD + momentum, Adam, ClippedSGD, ACClip} resumes from a checkpoint
taken mid-period to the uninterrupted run, on 2 gloo processes, with stateful callbacks attached.

All 20 pairs run in one pair of rank processes (``tests/scripts/resume_matrix.py``); the tests below read its
per-rank results. Each pair: 3 epochs of 6 batches with τ = 4, checkpoint after epoch 0 (optimizer step 6, the
middle of the second period), then a second run resumed from that checkpoint.
"""

import math

import pytest
import torch
from dist import run_ranks

pytestmark = pytest.mark.timeout(400)

STRATEGIES = ["local_sgd", "diloco", "lsgd", "lookahead_sync", "lookahead_local"]
OPTIMIZERS = ["sgdm", "adam", "clipped", "acclip"]
PAIRS = [(s, o) for s in STRATEGIES for o in OPTIMIZERS]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume_matrix")
    run_ranks("resume_matrix.py", out, ",".join(STRATEGIES), ",".join(OPTIMIZERS), timeout=380)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _differences(a, b, path="state"):
    """Paths where two nested states differ (tensors allclose 1e-9 with equal NaNs; floats likewise)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=1e-9, rtol=0, equal_nan=True)
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [path]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-9 else [path]
    return [] if a == b else [path]


def _pair(matrix, strategy, opt, r):
    res = matrix[1][r][strategy, opt]
    assert res["error"] is None, f"rank {r} failed:\n{res['error']}"
    return res["full"], res["resumed"]


@pytest.mark.parametrize("strategy,opt", PAIRS)
def test_mid_period_checkpoint_resumes_to_the_uninterrupted_run(matrix, strategy, opt):
    out, _ = matrix
    ckpt = torch.load(out / f"ckpt_{strategy}_{opt}" / "epoch=0.ckpt", weights_only=False)
    state = ckpt["lightning_opt"]["strategy"]
    assert ckpt["global_step"] == 6 and state["steps"] == {0: 6}
    assert state["in_sync"] is False and state["next_sync"] == {0: 8}, "the checkpoint is not mid-period"
    for r in (0, 1):
        full, resumed = _pair(matrix, strategy, opt, r)
        assert full["params"].shape[0] == 18 and resumed["params"].shape[0] == 12
        assert full["steps"] == resumed["steps"] == {0: 18}
        # every local step after the restore, the BatchNorm statistics and the final (consensus) weights
        torch.testing.assert_close(resumed["params"], full["params"][6:], atol=1e-6, rtol=0)
        torch.testing.assert_close(resumed["bn"], full["bn"][6:], atol=1e-6, rtol=0)
        torch.testing.assert_close(resumed["final"], full["final"], atol=1e-6, rtol=0)
        # optimizer state (momentum / Adam moments / ACClip's tau^alpha) and the package optimizers' counters
        assert _differences(resumed["opt_state"], full["opt_state"]) == []
        assert resumed["opt_extra"] == full["opt_extra"]
        assert torch.isfinite(full["params"]).all()
    # the checkpoint really was taken between syncs: local (non-DDP) modes had drifted apart at step 6
    p0, p1 = _pair(matrix, strategy, opt, 0)[0]["params"], _pair(matrix, strategy, opt, 1)[0]["params"]
    if strategy != "lookahead_sync":
        assert not torch.equal(p0[5], p1[5])
    else:  # fast weights are DDP steps: identical on both ranks, while the slow weights lag behind
        assert torch.equal(p0[5], p1[5])


@pytest.mark.parametrize("strategy,opt", PAIRS)
def test_time_average_monitor_state_resumes_on_rank_zero(matrix, strategy, opt):
    """TimeAverageMonitor (gain every 2 steps, windows shorter than the run) ends the resumed run with the
    uninterrupted run's accumulators on rank 0, whose callback state the checkpoint holds."""
    full, resumed = _pair(matrix, strategy, opt, 0)
    assert full["tam"]["gain_n"] == 9 and full["tam"]["avg"]["count"][0] == 18  # the gain and averages ran
    assert _differences(resumed["tam"], full["tam"]) == []


def test_time_average_monitor_state_resumes_on_every_rank(matrix):
    for strategy, opt in PAIRS:
        full, resumed = _pair(matrix, strategy, opt, 1)
        assert _differences(resumed["tam"], full["tam"]) == [], (strategy, opt)
