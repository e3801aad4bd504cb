"""Optimizer validation beyond the constructor sweep of tests/test_bad_inputs.py (which checks every bad argument's
message, accepted range included): added param groups, the optimizer-wide scope, integer parameters; the non-finite
gradient policy."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

from lightning_opt.optim import NonFiniteGradientError
from lightning_opt.optim.acclip import ACClip
from lightning_opt.optim.clipped_sgd import ClippedSGD
from lightning_opt.optim.ingd import StochasticINGD
from lightning_opt.optim.normalized_sgd import NormalizedSGD


def test_invalid_hyperparameter_in_added_param_group():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = ClippedSGD([p], lr=0.1)
    with pytest.raises(ValueError, match=re.escape("max_norm=-2.0")):
        opt.add_param_group({"params": [q], "max_norm": -2.0})


def test_clipping_scope_is_optimizer_wide():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=re.escape("scope='coordinate'")):
        ClippedSGD([{"params": [p]}, {"params": [q], "scope": "coordinate"}], lr=0.1)


def test_integer_parameters_are_rejected():
    with pytest.raises(ValueError, match="floating point"):
        ACClip([torch.zeros(2, dtype=torch.int64)])


ALL = [
    (ClippedSGD, dict(lr=0.1, momentum=0.9)),
    (ClippedSGD, dict(lr=0.1, scope="coordinate")),
    (NormalizedSGD, dict(lr=0.1, momentum=0.9)),
    (ACClip, dict(lr=0.01)),
    (StochasticINGD, dict(lr=0.5, seed=2)),
]
ALL_IDS = [f"{c.__name__}-{i}" for i, (c, _) in enumerate(ALL)]


def _setup(cls, kwargs, foreach=True):
    params = [torch.nn.Parameter(torch.arange(6.0).view(2, 3)), torch.nn.Parameter(torch.ones(4))]
    opt = cls(params, foreach=foreach, **kwargs)
    for k in range(2):
        for p in params:
            p.grad = torch.full_like(p, 0.5 + k)
        opt.step()
    return params, opt


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("cls,kwargs", ALL, ids=ALL_IDS)
def test_nonfinite_skip_leaves_everything_unchanged(cls, kwargs, foreach, bad):
    params, opt = _setup(cls, kwargs, foreach)
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    ref_params, ref_opt = _setup(cls, kwargs, foreach)
    params[0].grad = torch.ones(2, 3)
    params[1].grad = torch.tensor([1.0, bad, 1.0, 1.0])
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step()
    assert opt.nonfinite_steps == 1 and opt.steps == 2
    assert float(opt.last_stats["skipped"]) == 1.0
    assert not math.isfinite(float(opt.last_stats["grad_norm"]))
    for p, b, st in zip(params, before, state):
        assert torch.equal(p.detach(), b)
        assert opt.state[p].keys() == st.keys()
        for key, value in opt.state[p].items():
            assert torch.equal(value, st[key])
    # the counter is checkpointed
    restored = cls([torch.nn.Parameter(p.detach().clone()) for p in params], **kwargs)
    restored.load_state_dict(opt.state_dict())
    assert restored.nonfinite_steps == 1
    # the skipped step left no trace: the next step equals that of a run that never saw it
    for p, r in zip(params, ref_params):
        p.grad = torch.full_like(p, -0.25)
        r.grad = torch.full_like(r, -0.25)
    opt.step()
    ref_opt.step()
    for p, r in zip(params, ref_params):
        assert torch.equal(p, r)


@pytest.mark.parametrize("cls,kwargs", ALL, ids=ALL_IDS)
def test_nonfinite_raise(cls, kwargs):
    params, _ = _setup(cls, kwargs)
    opt = cls(params, nonfinite="raise", **kwargs)
    before = [p.detach().clone() for p in params]
    params[0].grad = torch.full((2, 3), float("nan"))
    params[1].grad = torch.ones(4)
    with pytest.raises(NonFiniteGradientError, match="non-finite gradient"):
        opt.step()
    assert opt.nonfinite_steps == 1
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


def test_overflowing_norm_counts_as_nonfinite():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = ClippedSGD([p], lr=0.1)
    p.grad = torch.full((2,), 3e38)  # finite entries, but the float32 2-norm overflows
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        opt.step()
    assert opt.nonfinite_steps == 1
    assert torch.equal(p.detach(), torch.zeros(2))


@pytest.mark.warning_location
def test_nonfinite_warning_points_at_the_caller():
    for cls, kwargs in ALL:
        p = torch.nn.Parameter(torch.zeros(2))
        opt = cls([p], **kwargs)
        p.grad = torch.full((2,), float("nan"))
        with pytest.warns(RuntimeWarning, match="non-finite gradient") as record:
            opt.step()
        assert record[0].filename == __file__, (cls.__name__, record[0].filename)


def test_tensor_lr_and_numpy_integer_seed_are_accepted():
    p = torch.nn.Parameter(torch.zeros(2))
    for cls, kwargs in ALL:  # a one-element tensor lr, as torch.optim accepts
        cls([p], **{**kwargs, "lr": torch.tensor(0.05)})
    with pytest.raises(ValueError, match=re.escape("ClippedSGD: invalid lr=tensor(nan)")):
        ClippedSGD([p], lr=torch.tensor(float("nan")))
    np = pytest.importorskip("numpy")
    opt = StochasticINGD([p], seed=np.int64(7))
    assert opt._generator.initial_seed() == 7


@pytest.mark.parametrize("foreach", [True, False])
def test_functional_cores_take_no_scratch(foreach):
    """The public functional cores run without the optimizer's scratch buffers and equal the optimizer's step."""
    from lightning_opt.optim.acclip import acclip_adaptive
    from lightning_opt.optim.clipped_sgd import cclip_momentum

    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(5, generator=gen), torch.randn(5, generator=gen) * 3
    p = torch.nn.Parameter(x.clone())
    opt = ClippedSGD([p], lr=0.1, max_norm=0.5, momentum=0.7, scope="coordinate", clip="momentum", foreach=foreach)
    p.grad = g.clone()
    opt.step()
    y, buf = x.clone(), torch.zeros(5)
    cclip_momentum([y], [g], [buf], None, 0.5, lr=0.1, weight_decay=0.0, momentum=0.7, nesterov=False,
                   foreach=foreach)
    assert torch.equal(y, p.detach()) and torch.equal(buf, opt.state[p]["momentum_buffer"])

    q = torch.nn.Parameter(x.clone())
    opt = ACClip([q], lr=0.1, adaptive=True, foreach=foreach)
    for _ in range(2):
        q.grad = g.clone()
        opt.step()
    z, m, v = x.clone(), torch.zeros(5), torch.zeros(5)
    for _ in range(2):
        acclip_adaptive([z], [g], [m], [v], None, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-5, weight_decay=1e-5,
                        foreach=foreach)
    assert torch.equal(z, q.detach()) and torch.equal(m, opt.state[q]["exp_avg"])
