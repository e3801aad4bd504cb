"""EASGDStrategy on 2 gloo processes: the elastic update against a hand-written reference of the equations, the
centre as consensus (checkpoints, ``fit``'s final weights), non-finite handling, exact mid-period resume."""

import pytest
import torch
from dist import run_ranks

from lightning_opt.strategies.easgd import EASGDStrategy

pytestmark = pytest.mark.timeout(300)

BETA, PERIOD, STEPS, CKPT_STEP = 0.43, 3, 10, 5  # β ≠ 0.5: β and 1 − β must not coincide


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("easgd")
    run_ranks("easgd_runs.py", out, BETA, PERIOD, STEPS, CKPT_STEP, world_size=2, timeout=240)
    return out, [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _reference_centers(d, alpha):
    """x̃_0 = x_0; at sync k: x_i⁺ = x_i − α(x_i − x̃), x̃⁺ = x̃ + α Σ_i (x_i − x̃) (pre-update values on the right)."""
    center = d[0]["x0"].double()
    posts, centers = [], []
    for k in range(len(d[0]["steps"])):
        pre = [r["pre"][k].double() for r in d]
        posts.append([x - alpha * (x - center) for x in pre])
        center = center + alpha * sum(x - center for x in pre)
        centers.append(center)
    return posts, centers


def test_elastic_update_matches_the_equations_over_several_syncs(runs):
    _, d = runs
    alpha = BETA / 2
    assert d[0]["alpha"] == pytest.approx(alpha)
    assert d[0]["steps"] == [3, 6, 9]
    assert torch.equal(d[0]["x0"], d[1]["x0"])  # both ranks start from rank 0's weights
    assert not torch.allclose(d[0]["pre"][0], d[1]["pre"][0])  # different shards: the workers drift apart
    posts, centers = _reference_centers(d, alpha)
    for k in range(3):
        for r in range(2):
            torch.testing.assert_close(d[r]["post"][k].double(), posts[k][r], atol=1e-6, rtol=0)
            torch.testing.assert_close(d[r]["center_post"][k].double(), centers[k], atol=1e-6, rtol=0)
        # the workers stay apart from the centre (elastic, not averaging); float buffers are averaged
        assert not torch.allclose(d[0]["post"][k], d[1]["post"][k])
        torch.testing.assert_close(d[0]["bn_post"][k], d[1]["bn_post"][k], atol=1e-7, rtol=0)
    # the centre moves a fraction β toward the workers' mean
    mean_pre = (d[0]["pre"][1] + d[1]["pre"][1]).double() / 2
    torch.testing.assert_close(centers[1], (1 - BETA) * centers[0] + BETA * mean_pre, atol=1e-6, rtol=0)


def test_centre_is_the_consensus_for_checkpoints_and_final_weights(runs):
    out, d = runs
    ckpt = torch.load(out / "mid.ckpt", weights_only=False)
    saved_center = torch.cat([c.reshape(-1) for c in ckpt["lightning_opt"]["strategy"]["extra"]["center"][0]])
    # step 5 is mid-period: the centre is the one after the step-3 sync
    torch.testing.assert_close(saved_center, d[0]["center_post"][0], atol=0, rtol=0)
    names = [n for n in ckpt["state_dict"] if "running" not in n and "num_batches" not in n]
    weights = torch.cat([ckpt["state_dict"][n].reshape(-1) for n in names])
    torch.testing.assert_close(weights, saved_center, atol=0, rtol=0)
    for r in range(2):
        assert torch.equal(d[r]["ckpt_before"], d[r]["ckpt_after"])  # saving does not touch the trajectory
        # validation at the same step sees the centre, and training resumes from the local weights
        torch.testing.assert_close(d[r]["val"], d[0]["center_post"][0], atol=0, rtol=0)
        assert torch.equal(d[r]["after_val"], d[r]["ckpt_before"])
        torch.testing.assert_close(ckpt["lightning_opt"]["ranks"][r]["module"]["net.0.weight"].reshape(-1),
                                   d[r]["ckpt_before"][:96], atol=0, rtol=0)
        # fit hands back the centre
        torch.testing.assert_close(d[r]["final"], d[r]["center_final"], atol=1e-7, rtol=0)
    torch.testing.assert_close(d[0]["center_final"], d[1]["center_final"], atol=0, rtol=0)


def test_nonfinite_rank_is_dropped_from_the_centre_and_reset_to_it(tmp_path):
    run_ranks("easgd_runs.py", tmp_path, BETA, PERIOD, 7, 2, 1, world_size=2, timeout=240)
    d = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    alpha = BETA / 2
    assert not torch.isfinite(d[1]["pre"][1]).all()  # poisoned after step 4, sync at step 6
    c_pre, x0 = d[0]["center_pre"][1].double(), d[0]["pre"][1].double()
    expected_center = c_pre + alpha * (x0 - c_pre)  # only rank 0 contributes
    torch.testing.assert_close(d[0]["center_post"][1].double(), expected_center, atol=1e-6, rtol=0)
    torch.testing.assert_close(d[0]["post"][1].double(), x0 - alpha * (x0 - c_pre), atol=1e-6, rtol=0)
    torch.testing.assert_close(d[1]["post"][1], d[1]["center_post"][1], atol=0, rtol=0)
    assert torch.isfinite(d[1]["final"]).all()


def test_resume_mid_period_is_exact_including_the_centre(tmp_path):
    run_ranks("easgd_resume.py", tmp_path, world_size=2, timeout=240)
    for r in (0, 1):
        d = torch.load(tmp_path / f"rank{r}.pt")
        assert d["full"].shape[0] == 18 and d["resumed"].shape[0] == 12
        torch.testing.assert_close(d["resumed"], d["full"][6:], atol=1e-6, rtol=0)
        torch.testing.assert_close(d["resumed_bn"], d["full_bn"][6:], atol=1e-6, rtol=0)
        torch.testing.assert_close(d["res_center"], d["full_center"], atol=1e-6, rtol=0)
        torch.testing.assert_close(d["res_final"], d["full_final"], atol=1e-6, rtol=0)


def test_defaults_and_alpha():
    s = EASGDStrategy()
    assert s.beta == 0.43 and s.strategy_name == "easgd"
    assert s.alpha == pytest.approx(0.43)  # world size 1 outside a process group
    assert "beta=0.43" in repr(s)
