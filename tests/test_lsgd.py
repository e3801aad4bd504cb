"""LSGDStrategy on 2 gloo processes: the pull, exact resume with the score windows, evaluation weights and logged
metrics. Leader choice, λ = 1, NaN handling and multi-leader groups are checked by value on threaded ranks
(test_strategy_ranks.py), node groups on real gloo in test_multinode.py, the NaN policies in test_nonfinite.py."""

import pytest
import torch
from dist import run_ranks

from lightning_opt.strategies import LSGDStrategy

pytestmark = pytest.mark.timeout(400)


def _run(tmp_path, world, pull, global_pull, group_size, global_period, offsets):
    args = [tmp_path, "run", pull, global_pull, group_size, global_period, ",".join(map(str, offsets))]
    run_ranks("lsgd_runs.py", *args, world_size=world, timeout=300)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def test_pull_moves_each_worker_a_fraction_lambda_toward_the_leader(tmp_path):
    """Teng et al. 2019, eq. (3): x ← x − λ(x − x̃), here with λ = 0.25 (so 1 − λ would land elsewhere)."""
    d = _run(tmp_path, 2, 0.25, 0.25, "none", "none", [1.0, 0.0])
    assert [h["leader"] for h in d[0]["history"]] == [1, 1, 1, 1]
    expected = d[0]["pre"] - 0.25 * (d[0]["pre"] - d[1]["pre"])
    torch.testing.assert_close(d[0]["post"], expected, atol=1e-7, rtol=0)
    assert torch.equal(d[1]["post"], d[1]["pre"])  # the leader does not move


def test_resume_mid_period_is_exact_including_score_windows(tmp_path):
    run_ranks("local_sgd_resume.py", tmp_path, "sgd", "lsgd", timeout=300)
    for r in (0, 1):
        d = torch.load(tmp_path / f"rank{r}.pt")
        torch.testing.assert_close(d["resumed"], d["full"][6:], atol=1e-6, rtol=0)


def test_group_size_must_divide_world():
    class FourRanks(LSGDStrategy):
        world = 4

    with pytest.raises(ValueError, match=r"invalid group_size=3; expected a divisor of the world size \(4 processes\)"):
        FourRanks(group_size=3)._resolved_group_size()


def test_eval_weights_center_leader_local_and_logged_sync_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_ranks("lsgd_eval.py", tmp_path, timeout=300)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    center = (r0["center"]["local"] + r1["center"]["local"]) / 2
    for r in (r0, r1):
        torch.testing.assert_close(r["center"]["final"], center, atol=1e-7, rtol=0)
        assert torch.equal(r["leader"]["final"], r1["leader"]["local"])  # rank 1 has the lower loss
        assert torch.equal(r["local"]["final"], r["local"]["local"])
    (events,) = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events))
    acc.Reload()
    leaders = [e.value for e in acc.Scalars("lsgd/leader")]
    assert leaders == [1.0, 1.0] and acc.Scalars("lsgd/score_spread")[0].value > 0.5
    assert "comm/bytes" in acc.Tags()["scalars"]
