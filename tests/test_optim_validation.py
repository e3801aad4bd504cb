"""Invalid hyperparameters raise ValueError (argument, value, range); the non-finite gradient policy."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

from lightning_opt.optim._common import NonFiniteGradientError
from lightning_opt.optim.acclip import ACClip
from lightning_opt.optim.clipped_sgd import ClippedSGD
from lightning_opt.optim.ingd import StochasticINGD
from lightning_opt.optim.normalized_sgd import NormalizedSGD

INVALID = [
    (ClippedSGD, dict(lr=-1.0), "lr", ">= 0"),
    (ClippedSGD, dict(lr=float("nan")), "lr", ">= 0"),
    (ClippedSGD, dict(max_norm=0.0), "max_norm", "> 0"),
    (ClippedSGD, dict(max_norm=float("inf")), "max_norm", "> 0"),
    (ClippedSGD, dict(momentum=1.0), "momentum", "0 <= momentum < 1"),
    (ClippedSGD, dict(momentum=-0.1), "momentum", "0 <= momentum < 1"),
    (ClippedSGD, dict(weight_decay=-1e-4), "weight_decay", ">= 0"),
    (ClippedSGD, dict(scope="layer"), "scope", "'global', 'coordinate'"),
    (ClippedSGD, dict(nesterov=True), "nesterov", "momentum in (0, 1)"),
    (ClippedSGD, dict(lr="0.1"), "lr", ">= 0"),
    (ClippedSGD, dict(foreach="yes"), "foreach", "True, False or None"),
    (ClippedSGD, dict(nonfinite="ignore"), "nonfinite", "'skip', 'raise'"),
    (NormalizedSGD, dict(lr=-0.5), "lr", ">= 0"),
    (NormalizedSGD, dict(beta=-1.0), "beta", ">= 0"),
    (NormalizedSGD, dict(momentum=1.5), "momentum", "0 <= momentum < 1"),
    (NormalizedSGD, dict(weight_decay=-1.0), "weight_decay", ">= 0"),
    (ACClip, dict(lr=-1e-4), "lr", ">= 0"),
    (ACClip, dict(betas=(1.0, 0.99)), "betas[0]", "0 <= betas[0] < 1"),
    (ACClip, dict(betas=(0.9, -0.01)), "betas[1]", "0 <= betas[1] < 1"),
    (ACClip, dict(betas=(0.9,)), "betas", "pair"),
    (ACClip, dict(alpha=0.0), "alpha", "(0.0, 2.0]"),
    (ACClip, dict(alpha=2.5), "alpha", "(0.0, 2.0]"),
    (ACClip, dict(eps=0.0), "eps", "> 0"),
    (ACClip, dict(weight_decay=-1e-5), "weight_decay", ">= 0"),
    (StochasticINGD, dict(lr=-1.0), "lr", ">= 0"),
    (StochasticINGD, dict(beta=1.0), "beta", "0 <= beta < 1"),
    (StochasticINGD, dict(p=-1.0), "p", ">= 0"),
    (StochasticINGD, dict(q=-0.1), "q", ">= 0"),
    (StochasticINGD, dict(p=0.0, q=0.0), "p", "p + q > 0"),
    (StochasticINGD, dict(weight_decay=-5e-4), "weight_decay", ">= 0"),
    (StochasticINGD, dict(seed=-3), "seed", "int >= 0"),
]


@pytest.mark.parametrize("cls,kwargs,arg,accepted", INVALID,
                         ids=[f"{c.__name__}-{a}-{i}" for i, (c, _, a, _) in enumerate(INVALID)])
def test_invalid_hyperparameter_raises_value_error(cls, kwargs, arg, accepted):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError) as info:
        cls([p], **kwargs)
    msg = str(info.value)
    assert f"{arg}=" in msg
    if arg in kwargs:
        assert f"{arg}={kwargs[arg]!r}" in msg, msg
    assert accepted in msg, msg
    assert cls.__name__ in msg


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
