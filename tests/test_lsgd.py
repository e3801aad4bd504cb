"""LSGDStrategy on 2 and 4 gloo processes: pulls, leader choice, NaN handling, multi-leader groups, resume."""

import pytest
import torch
from dist import run_ranks

from lightning_opt.strategies import LSGDStrategy

pytestmark = pytest.mark.timeout(400)


def _run(tmp_path, world, pull, global_pull, group_size, global_period, offsets, poison=None):
    args = [tmp_path, "run", pull, global_pull, group_size, global_period, ",".join(map(str, offsets))]
    if poison is not None:
        args.append(poison)
    run_ranks("lsgd_runs.py", *args, world_size=world, timeout=300)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def test_pull_moves_each_worker_a_fraction_lambda_toward_the_leader(tmp_path):
    """Teng et al. 2019, eq. (3): x ← x − λ(x − x̃), here with λ = 0.25 (so 1 − λ would land elsewhere)."""
    d = _run(tmp_path, 2, 0.25, 0.25, "none", "none", [1.0, 0.0])
    assert [h["leader"] for h in d[0]["history"]] == [1, 1, 1, 1]
    expected = d[0]["pre"] - 0.25 * (d[0]["pre"] - d[1]["pre"])
    torch.testing.assert_close(d[0]["post"], expected, atol=1e-7, rtol=0)
    assert torch.equal(d[1]["post"], d[1]["pre"])  # the leader does not move


def test_pull_one_and_argmin_leader_over_four_workers(tmp_path):
    offsets = [3.0, 1.0, 2.0, 0.5]
    d = _run(tmp_path, 4, 1.0, 1.0, "4", "none", offsets)
    assert all(h["leader"] == 3 for h in d[0]["history"])
    for r in range(4):
        assert torch.equal(d[r]["post"], d[3]["pre"])
    scores = torch.tensor(d[0]["history"][0]["scores"])
    assert int(torch.argmin(scores)) == 3 and (scores[0] - scores[3]) > 2.0


def test_nan_worker_never_leads_and_is_reset_to_leader(tmp_path):
    d = _run(tmp_path, 2, 0.5, 0.5, "none", "none", [1.0, 0.0], poison=1)
    first_after_poison = d[0]["history"][1]  # the sync after step 4; rank 1 was poisoned after step 3
    assert first_after_poison["leader"] == 0
    assert first_after_poison["scores"][1] == float("inf")
    assert torch.equal(d[1]["post"][1], d[0]["pre"][1])  # reset to the leader, not pulled halfway
    assert torch.isfinite(d[1]["post"]).all()


def test_multi_leader_groups_then_global_leader(tmp_path):
    """Teng et al. 2019, multi-leader (eq. (2)): every τ = 2 steps x ← x − λ(x − x̃_group), λ = 0.25; every
    τ_G = 4 steps that pull, then x ← x − λ_G(x − x̃_global) with λ_G = 0.6, on the group-pulled weights."""
    lam, lam_g = 0.25, 0.6
    offsets = [3.0, 1.0, 2.0, 0.5]  # group {0,1} leader 1; group {2,3} leader 3; global leader 3
    d = _run(tmp_path, 4, lam, lam_g, "2", "4", offsets)
    assert [h["leader"] for h in d[0]["history"]] == [3, 3, 3, 3]
    group_leader = {0: 1, 1: 1, 2: 3, 3: 3}
    for k, global_sync in enumerate([False, True, False, True]):  # syncs after steps 2, 4, 6, 8
        pre = [x["pre"][k].double() for x in d]
        local = [pre[r] - lam * (pre[r] - pre[group_leader[r]]) for r in range(4)]
        expected = [y - lam_g * (y - local[3]) for y in local] if global_sync else local
        for r in range(4):
            torch.testing.assert_close(d[r]["post"][k].double(), expected[r], atol=1e-6, rtol=0)
    assert not torch.allclose(d[0]["post"][0], d[2]["post"][0])  # groups apart after a local-only sync


def test_resume_mid_period_is_exact_including_score_windows(tmp_path):
    run_ranks("local_sgd_resume.py", tmp_path, "sgd", "lsgd", timeout=300)
    for r in (0, 1):
        d = torch.load(tmp_path / f"rank{r}.pt")
        torch.testing.assert_close(d["resumed"], d["full"][6:], atol=1e-6, rtol=0)


def test_group_size_must_divide_world():
    class FourRanks(LSGDStrategy):
        world = 4

    with pytest.raises(ValueError, match="`group_size`"):
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
