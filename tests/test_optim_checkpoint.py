"""state_dict round trips resume exactly; StochasticINGD's iterate swap."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from lightning_opt.optim.acclip import ACClip
from lightning_opt.optim.clipped_sgd import ClippedSGD
from lightning_opt.optim.ingd import StochasticINGD
from lightning_opt.optim.normalized_sgd import NormalizedSGD

SHAPES = [(3, 5), (5,)]
CONFIGS = [
    (ClippedSGD, dict(lr=0.1, max_norm=1.0, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (ClippedSGD, dict(lr=0.1, max_norm=0.3, momentum=0.9, scope="coordinate")),
    (NormalizedSGD, dict(lr=0.1, beta=0.5, momentum=0.9)),
    (ACClip, dict(lr=1e-2, alpha=1.5)),
    (StochasticINGD, dict(lr=0.5, seed=11)),
]
IDS = [f"{cls.__name__}-{i}" for i, (cls, _) in enumerate(CONFIGS)]


def grads(k: int, dtype=torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + k)
    return [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]


def new_params(dtype=torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def advance(params, opt, ks) -> None:
    for k in ks:
        for p, g in zip(params, grads(k, params[0].dtype)):
            p.grad = g
        opt.step()


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cls,kwargs", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_exact(cls, kwargs, dtype):
    params = new_params(dtype)
    opt = cls(params, **kwargs)
    advance(params, opt, range(3))
    ckpt = roundtrip({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()})
    advance(params, opt, range(3, 7))

    resumed = new_params(dtype)
    with torch.no_grad():
        for p, v in zip(resumed, ckpt["params"]):
            p.copy_(v)
    kw = dict(kwargs, seed=999) if cls is StochasticINGD else kwargs  # the sampler state must come from ckpt
    opt2 = cls(resumed, **kw)
    opt2.load_state_dict(ckpt["opt"])
    for p in resumed:
        for key, value in opt2.state[p].items():
            assert value.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype), key
    advance(resumed, opt2, range(3, 7))
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
        for key, value in opt.state[a].items():
            assert torch.equal(value, opt2.state[b][key]), key
    assert opt2.steps == opt.steps == 7


@pytest.mark.parametrize("cls,kwargs", CONFIGS, ids=IDS)
def test_load_does_not_alias_the_source_dict(cls, kwargs):
    params = new_params()
    opt = cls(params, **kwargs)
    advance(params, opt, range(2))
    sd = opt.state_dict()
    frozen = copy.deepcopy(sd)
    opt.load_state_dict(sd)
    advance(params, opt, range(2, 4))
    for key, st in sd["state"].items():
        for name, value in st.items():
            assert torch.equal(value, frozen["state"][key][name]), name


def test_ingd_swap_iterate_roundtrip_and_guards():
    params = new_params()
    opt = StochasticINGD(params, lr=0.5, seed=1)
    with opt.swap_iterate():  # before any step x == y: no-op
        pass
    advance(params, opt, range(3))
    y = [p.detach().clone() for p in params]
    assert not opt.iterate_swapped_in
    with opt.swap_iterate():
        assert opt.iterate_swapped_in
        for p in params:
            assert torch.equal(p.detach(), opt.state[p]["x"])
        with pytest.raises(RuntimeError, match="swapped in"):
            opt.step()
        with pytest.raises(RuntimeError, match="already"):
            opt.swap_in_iterate()
    for p, yi in zip(params, y):
        assert torch.equal(p.detach(), yi)
        assert "y" not in opt.state[p]
    with pytest.raises(RuntimeError, match="not swapped in"):
        opt.swap_out_iterate()
    assert not all(torch.equal(p.detach(), opt.state[p]["x"]) for p in params)


def test_ingd_swap_iterate_passes_over_a_parameter_that_never_stepped():
    """A parameter without a gradient yet (a frozen or not-yet-used layer) before the trained ones: it keeps its
    value, and every later parameter still swaps to its iterate x."""
    frozen, params = torch.nn.Parameter(torch.ones(3)), new_params()
    opt = StochasticINGD([frozen, *params], lr=0.5, seed=1)
    advance(params, opt, range(3))
    before = frozen.detach().clone()
    with opt.swap_iterate():
        assert torch.equal(frozen.detach(), before)
        for p in params:
            assert torch.equal(p.detach(), opt.state[p]["x"])
    assert not opt.state.get(frozen)


def test_ingd_checkpoint_taken_while_swapped_in_resumes_exactly():
    """A checkpoint whose model weights are x (saved inside swap_iterate) resumes the y-trajectory."""
    params = new_params()
    opt = StochasticINGD(params, lr=0.5, seed=5)
    advance(params, opt, range(3))
    with opt.swap_iterate():
        ckpt = roundtrip({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()})
    advance(params, opt, range(3, 6))

    resumed = new_params()
    with torch.no_grad():  # model weights first (they are x), then the optimizer state (restores y)
        for p, v in zip(resumed, ckpt["params"]):
            p.copy_(v)
    opt2 = StochasticINGD(resumed, lr=0.5, seed=0)
    opt2.load_state_dict(ckpt["opt"])
    assert not opt2.iterate_swapped_in
    advance(resumed, opt2, range(3, 6))
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["x"], opt2.state[b]["x"])


def test_ingd_default_seed_follows_torch_manual_seed():
    torch.manual_seed(7)
    a = new_params()
    opt_a = StochasticINGD(a)
    torch.manual_seed(7)
    b = new_params()
    opt_b = StochasticINGD(b)
    advance(a, opt_a, range(3))
    advance(b, opt_b, range(3))
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
