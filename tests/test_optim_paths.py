"""foreach (multi-tensor) path == per-tensor reference path; precision policy; param groups; schedulers."""

from __future__ import annotations

import pytest
import torch

from lightning_opt.optim.acclip import ACClip
from lightning_opt.optim.clipped_sgd import ClippedSGD
from lightning_opt.optim.ingd import StochasticINGD
from lightning_opt.optim.normalized_sgd import NormalizedSGD

SHAPES = [(4, 6), (6,), (2, 3, 5), ()]

CONFIGS = [
    (ClippedSGD, dict(lr=0.1, max_norm=1.0)),
    (ClippedSGD, dict(lr=0.1, max_norm=1.0, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (ClippedSGD, dict(lr=0.1, max_norm=0.3, momentum=0.9, weight_decay=0.01, scope="coordinate")),
    (ClippedSGD, dict(lr=0.1, max_norm=0.3, scope="coordinate", maximize=True)),
    (NormalizedSGD, dict(lr=0.1, beta=0.5)),
    (NormalizedSGD, dict(lr=0.1, beta=0.5, momentum=0.9, weight_decay=0.01)),
    (ACClip, dict()),
    (ACClip, dict(lr=1e-2, alpha=1.5, weight_decay=0.1, maximize=True)),
    (ACClip, dict(lr=1e-2, alpha=2.0)),
    (StochasticINGD, dict(seed=3)),
    (StochasticINGD, dict(seed=3, lr=0.5, p=2.0, q=1.0, weight_decay=0.01, maximize=True)),
]
IDS = [f"{cls.__name__}-{i}" for i, (cls, _) in enumerate(CONFIGS)]


def run(cls, kwargs, *, foreach: bool, dtype=torch.float32, steps: int = 5, groups: bool = False):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    if groups:  # two groups with different lr; global norms must still span both
        spec = [{"params": params[:2]}, {"params": params[2:], "lr": kwargs.get("lr", 1e-3) * 0.5}]
    else:
        spec = params
    opt = cls(spec, foreach=foreach, **kwargs)
    for k in range(steps):
        for i, p in enumerate(params):
            # parameter 1 has no gradient in step 2 (left out of that step)
            p.grad = None if (i == 1 and k == 2) else (2.0 * torch.randn(p.shape, generator=gen)).to(dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("cls,kwargs", CONFIGS, ids=IDS)
@pytest.mark.parametrize("groups", [False, True])
def test_foreach_matches_per_tensor(cls, kwargs, groups):
    a, opt_a = run(cls, kwargs, foreach=True, groups=groups)
    b, opt_b = run(cls, kwargs, foreach=False, groups=groups)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-6)
        for key, va in opt_a.state[pa].items():
            torch.testing.assert_close(va, opt_b.state[pb][key], rtol=1e-6, atol=1e-6)
    for key, va in opt_a.last_stats.items():
        torch.testing.assert_close(va, opt_b.last_stats[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls,kwargs", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_fp32_state(cls, kwargs, dtype):
    a, opt_a = run(cls, kwargs, foreach=True, dtype=dtype)
    b, opt_b = run(cls, kwargs, foreach=False, dtype=dtype)
    for pa, pb in zip(a, b):
        assert pa.dtype == dtype
        assert torch.isfinite(pa).all()
        for key, va in opt_a.state[pa].items():
            assert va.dtype == torch.float32, key
            torch.testing.assert_close(va, opt_b.state[pb][key], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pa, pb, rtol=1e-2, atol=1e-2)


def test_low_precision_tracks_fp32_run():
    """With fp32 state, a bf16 run stays close to the fp32 run (INGD's iterate x is an fp32 master copy)."""
    kwargs = dict(seed=3, lr=0.1)
    a, opt_a = run(StochasticINGD, kwargs, foreach=True, dtype=torch.bfloat16, steps=20)
    b, opt_b = run(StochasticINGD, kwargs, foreach=True, dtype=torch.float32, steps=20)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(opt_a.state[pa]["x"], opt_b.state[pb]["x"], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("cls,kwargs", CONFIGS[::3], ids=IDS[::3])
def test_lr_scheduler_drives_lr(cls, kwargs):
    p = torch.nn.Parameter(torch.ones(3))
    opt = cls([p], **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lr0 = opt.param_groups[0]["lr"]
    for _ in range(2):
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr0 * 0.25)


@pytest.mark.parametrize("cls,kwargs", CONFIGS, ids=IDS)
def test_maximize_is_minimize_of_negated_gradient(cls, kwargs):
    kwargs = {k: v for k, v in kwargs.items() if k != "maximize"}
    p, q = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt_p, opt_q = cls([p], maximize=True, **kwargs), cls([q], **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        g = torch.randn(4, generator=gen)
        p.grad, q.grad = g.clone(), -g
        opt_p.step()
        opt_q.step()
    torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_step_returns_closure_loss_and_without_grads_does_nothing():
    p = torch.nn.Parameter(torch.ones(2))
    for opt in (ClippedSGD([p]), NormalizedSGD([p]), ACClip([p]), StochasticINGD([p], seed=0)):
        assert opt.step() is None  # no gradients: nothing to do
        assert torch.equal(p.detach(), torch.ones(2))
        loss = opt.step(lambda: torch.tensor(3.0))
        assert float(loss) == 3.0
