"""LookaheadStrategy: single-process reference, 2-process sync/local modes, schedules, resume, validation."""

import pytest
import torch
from dist import run_ranks
from scripts._common import TinyModel, make_data

from lightning_opt.strategies import LookaheadStrategy

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    run_ranks("lookahead_runs.py", one, world_size=1, timeout=300)
    run_ranks("lookahead_runs.py", two, world_size=2, timeout=300)
    return torch.load(one / "rank0.pt"), [torch.load(two / f"rank{r}.pt") for r in (0, 1)]


def reference_lookahead(opt="sgd", k=3, alpha=0.5, pullback="none", steps=12):
    """Lookahead written from the equations: k inner steps, then z ← z + α(x − z), x ← z."""
    model = TinyModel(bn=False)
    params = list(model.parameters())
    inner = (torch.optim.Adam(params, lr=0.01) if opt == "adam"
             else torch.optim.SGD(params, lr=0.05, momentum=0.9))
    slow = [p.detach().clone() for p in params]
    slow_mom = [torch.zeros_like(p) for p in params]
    ds, out = make_data(96), []
    for t in range(1, steps + 1):
        x, y = ds[8 * (t - 1): 8 * t]
        inner.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        inner.step()
        if t % k == 0:
            with torch.no_grad():
                for p, z, mz in zip(params, slow, slow_mom):
                    z += alpha * (p - z)
                    p.copy_(z)
                    m = inner.state[p].get("momentum_buffer")
                    if m is not None and pullback == "reset":
                        m.zero_()
                    elif m is not None and pullback == "pullback":
                        m.mul_(alpha).add_(mz, alpha=1 - alpha)
                        mz.copy_(m)
        out.append(torch.cat([p.detach().reshape(-1).clone() for p in params]))
    return torch.stack(out)


@pytest.mark.parametrize("name,opt,pullback", [("sgd_none", "sgd", "none"), ("sgd_reset", "sgd", "reset"),
                                               ("sgd_pullback", "sgd", "pullback"), ("adam", "adam", "none")])
def test_single_device_matches_reference_step_for_step(runs, name, opt, pullback):
    ref = reference_lookahead(opt, pullback=pullback)
    torch.testing.assert_close(runs[0][name]["params"], ref, atol=1e-6, rtol=1e-5)


def test_pullback_modes_differ(runs):
    one = runs[0]
    assert not torch.allclose(one["sgd_none"]["params"][-1], one["sgd_reset"]["params"][-1])
    assert not torch.allclose(one["sgd_reset"]["params"][-1], one["sgd_pullback"]["params"][-1])


def test_slow_weights_are_the_final_model(runs):
    # 12 steps, k=3: the last step is a sync, so fast == slow and the model holds them
    one = runs[0]
    torch.testing.assert_close(one["sgd_none"]["final"], one["sgd_none"]["params"][-1])


def test_two_process_sync_mode_equals_one_process_doubled_batch(runs):
    one, (r0, r1) = runs
    torch.testing.assert_close(r0["sync"]["params"], one["batch16"]["params"], atol=1e-6, rtol=1e-5)
    assert torch.equal(r0["sync"]["params"], r1["sync"]["params"])


def test_local_mode_equals_local_sgd_with_outer_lr_alpha(runs):
    _, (r0, r1) = runs
    for r in (r0, r1):
        torch.testing.assert_close(r["local"]["params"], r["localsgd"]["params"], atol=1e-7, rtol=0)
    assert not torch.equal(r0["local"]["params"][1], r1["local"]["params"][1])  # local steps differ by rank


def test_constant_horizon_increases_k_when_lr_decays(runs):
    h = runs[1][0]["horizon"]
    # lr 0.1 → k = 0.3/0.1 = 3; after StepLR halves it twice (steps 6, 12, 18), k = 0.3/0.0125 = 24
    assert h["period"] > 3 and h["syncs"] >= 3


@pytest.mark.parametrize("mode", ["sync", "local"])
def test_resume_mid_period_is_exact(tmp_path, mode):
    run_ranks("local_sgd_resume.py", tmp_path, "sgd", f"lookahead_{mode}", timeout=300)
    for r in (0, 1):
        d = torch.load(tmp_path / f"rank{r}.pt")
        torch.testing.assert_close(d["resumed"], d["full"][6:], atol=1e-6, rtol=0)
        torch.testing.assert_close(d["res_final"], d["full_final"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs,arg", [({"alpha": 0.0}, "alpha"), ({"alpha": 1.5}, "alpha"), ({"period": 0}, "period"),
                                        ({"mode": "async"}, "mode"), ({"pullback_momentum": "x"}, "pullback_momentum")])
def test_invalid_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        LookaheadStrategy(**kwargs)


def test_timm_lookahead_differs_only_by_its_lazy_first_slow_update(runs):
    """timm creates its slow copy at the first sync (a no-op update); ours starts at x_0 as in the papers' Alg. 1.
    timm's trajectory equals ours when the slow weights are initialised with the fast weights at step k."""
    from timm.optim import Lookahead

    model = TinyModel(bn=False)
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), alpha=0.5, k=3)
    ds, timm_traj = make_data(96), []
    for t in range(1, 13):
        x, y = ds[8 * (t - 1): 8 * t]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        timm_traj.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
    timm_traj = torch.stack(timm_traj)
    ours = runs[0]["sgd_none"]["params"]
    torch.testing.assert_close(timm_traj[:2], ours[:2])  # identical before the first sync
    assert (timm_traj[2] - ours[2]).abs().max() > 1e-3  # ours pulls back toward x_0 at step 3; timm does not
