"""LookaheadStrategy on 2 processes: sync and local modes against the float64 reference, resume."""

import pytest
import torch
from dist import run_ranks
from reference import lookahead

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    two = tmp_path_factory.mktemp("two")
    run_ranks("lookahead_runs.py", two, world_size=2, timeout=300)
    return [torch.load(two / f"rank{r}.pt") for r in (0, 1)]


def test_sync_mode_is_lookahead_on_the_averaged_gradient(runs):
    """Gradients averaged every step: both ranks follow single-worker Lookahead on the 16-row batch (rank 0's
    rows and rank 1's interleaved), α = 0.3, k = 2."""
    ref = lookahead(0.3, 2, 6, batch=16, mu=0.0)[0]
    for r in runs:
        torch.testing.assert_close(r["sync"]["params"].double(), ref, atol=2e-6, rtol=1e-5)
    assert torch.equal(runs[0]["sync"]["params"], runs[1]["sync"]["params"])


def test_local_mode_is_the_multi_agent_form(runs):
    """No per-step communication; at a sync z ← z + α(x̄ − z) with x̄ the mean of the two workers, α = 0.3."""
    refs = lookahead(0.3, 3, 12, world=2, mu=0.0)
    for r, ref in zip(runs, refs):
        torch.testing.assert_close(r["local"]["params"].double(), ref, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(r["local"]["final"].double(), ref[-1], atol=2e-6, rtol=1e-5)
    assert not torch.equal(runs[0]["local"]["params"][1], runs[1]["local"]["params"][1])  # local steps differ


@pytest.mark.parametrize("mode", ["sync", "local"])
def test_resume_mid_period_is_exact(tmp_path, mode):
    run_ranks("local_sgd_resume.py", tmp_path, "sgd", f"lookahead_{mode}", timeout=300)
    for r in (0, 1):
        d = torch.load(tmp_path / f"rank{r}.pt")
        torch.testing.assert_close(d["resumed"], d["full"][6:], atol=1e-6, rtol=0)
        torch.testing.assert_close(d["res_final"], d["full_final"], atol=1e-6, rtol=0)
