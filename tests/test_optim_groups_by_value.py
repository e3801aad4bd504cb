"""The optimizers' remaining documented behaviours pinned by value: a weight decay of exactly 1 (a rate the code
must not mistake for "no decay"), the foreach / per-tensor routing of ``foreach=None|True|False``, the defaults the
docstrings name, statistics at a zero or sub-unit gradient norm, ties at the clipping threshold, the non-finite
counter and message, and checkpoints without the ``lightning_opt`` entry.

The parameter references are those of ``test_optim_reference.py`` (float64 plain-Python loops from the docstrings'
equations), run here with other hyperparameters; the rest is computed by hand in each test."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from test_optim_reference import (
    ACCLIP_HPS,
    ADAPTIVE_HPS,
    CCLIP_TAUS,
    GCLIP_TAUS,
    INGD_HPS,
    NGD_BETAS,
    SEED,
    _build,
    _close,
    _flat,
    _grads,
    _run_acclip,
    _run_sgd_family,
    _set_grads,
    _sgd_hps,
    _started,
    acclip_adaptive_step,
    acclip_step,
    cclip,
    cclip_momentum_step,
    gclip,
    ingd_step,
    ngd,
)

from lightning_opt.optim import ACClip, ClippedSGD, NonFiniteGradientError, NormalizedSGD, StochasticINGD


def _decay_one(hps):
    """Every other group decays with weight_decay = 1 exactly (the rest keep theirs, 0 included)."""
    return [{**hp, "weight_decay": 1.0} if gi % 2 == 0 else hp for gi, hp in enumerate(hps)]


# ------------------------------------------------------------------------------------- weight decay 1


@pytest.mark.parametrize("path", ["foreach", "per_tensor"])
@pytest.mark.parametrize("kind", ["gclip", "cclip", "cclip_momentum", "ngd", "acclip", "acclip_adaptive"])
def test_weight_decay_of_one_is_applied(kind, path):
    if kind in ("gclip", "cclip", "ngd"):
        if kind == "ngd":
            hps, transform, cls, extra = _sgd_hps("beta", NGD_BETAS), ngd, NormalizedSGD, {}
        else:
            taus = GCLIP_TAUS if kind == "gclip" else CCLIP_TAUS
            hps, transform = _sgd_hps("max_norm", taus), gclip if kind == "gclip" else cclip
            cls, extra = ClippedSGD, {"scope": "global" if kind == "gclip" else "coordinate"}
        for _ in _run_sgd_family(cls, _decay_one(hps), transform, path, **extra):
            pass
    elif kind == "cclip_momentum":
        hps = _decay_one(_sgd_hps("max_norm", CCLIP_TAUS))
        params, opt = _build(ClippedSGD, hps, path, scope="coordinate", clip="momentum")
        x = _flat(params)
        bufs = [[[0.0] * len(t) for t in ts] for ts in x]
        for t, grads in enumerate(_grads(len(hps))):
            cclip_momentum_step(x, bufs, _set_grads(params, grads), hps)
            opt.step()
            for gi, ps in enumerate(params):
                for ti, p in enumerate(ps):
                    _close(p, x[gi][ti], f"step {t} group {gi} param {ti}")
    elif kind == "acclip":
        _run_acclip(_decay_one(ACCLIP_HPS), acclip_step, path)
    else:
        _run_acclip(_decay_one(ADAPTIVE_HPS), acclip_adaptive_step, path, adaptive=True)


@pytest.mark.parametrize("path", ["foreach", "per_tensor"])
def test_ingd_weight_decay_of_one_is_applied(path):
    hps = _decay_one(INGD_HPS)
    params, opt = _build(StochasticINGD, hps, path, seed=SEED)
    gen = torch.Generator().manual_seed(SEED)
    y = _flat(params)
    x: list[list] = [[None] * len(ts) for ts in y]
    m: list[list] = [[None] * len(ts) for ts in y]
    for t, grads in enumerate(_grads(len(hps))):
        flat = _set_grads(params, grads)
        opt.step()
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        ingd_step(x, y, m, flat, hps, u)
        for gi, ps in enumerate(params):
            for ti, p in enumerate(ps):
                _close(p, y[gi][ti], f"step {t} group {gi} param {ti}")
                if _started(t, gi, ti):
                    _close(opt.state[p]["m"], m[gi][ti], f"step {t} group {gi} m {ti}")


# ------------------------------------------------------------------------------------- foreach routing


CONFIGS = [
    (ClippedSGD, dict(lr=0.1, max_norm=0.5, momentum=0.3, weight_decay=0.2)),
    (ClippedSGD, dict(lr=0.1, max_norm=0.5, momentum=0.3, nesterov=True, weight_decay=0.2)),
    (ClippedSGD, dict(lr=0.1, max_norm=0.3, momentum=0.3, weight_decay=0.2, scope="coordinate")),
    (ClippedSGD, dict(lr=0.1, max_norm=0.3, momentum=0.3, weight_decay=0.2, scope="coordinate", clip="momentum")),
    (NormalizedSGD, dict(lr=0.1, beta=0.7, momentum=0.3, weight_decay=0.2)),
    (ACClip, dict(lr=0.1, weight_decay=0.2)),
    (ACClip, dict(lr=0.1, alpha=1.5, weight_decay=0.2)),
    (ACClip, dict(lr=0.1, weight_decay=0.2, adaptive=True)),
    (StochasticINGD, dict(lr=0.1, weight_decay=0.2, seed=3)),
]
IDS = [f"{c.__name__}-{i}" for i, (c, _) in enumerate(CONFIGS)]


@pytest.fixture
def foreach_calls(monkeypatch):
    """Names of the ``torch._foreach_*`` kernels called while the test runs."""
    calls: list[str] = []
    for name in [n for n in dir(torch) if n.startswith("_foreach_")]:
        fn = getattr(torch, name)

        def spy(*args, _fn=fn, _name=name, **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    return calls


@pytest.mark.parametrize("cls, kwargs", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreach_none_means_the_multi_tensor_kernels_and_false_means_none(cls, kwargs, dtype, foreach_calls):
    """Class docstring of the base: ``foreach=True`` (default when None) uses ``torch._foreach_*`` kernels,
    ``foreach=False`` a plain per-tensor loop (also for maximize and half-precision parameters)."""
    results = {}
    for foreach in (None, True, False):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in ((3, 2), (4,))]
        opt = cls(params, **kwargs, foreach=foreach, maximize=True)
        foreach_calls.clear()
        for step in range(2):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) * (1 + step)).to(dtype)
            opt.step()
        if foreach is False:
            assert foreach_calls == [], foreach_calls
        else:
            assert foreach_calls, "no foreach kernel"
            if cls is not StochasticINGD and dtype == torch.bfloat16:
                assert "_foreach_copy_" in foreach_calls  # the half-precision parameters written back at once
        results[foreach] = [p.detach().float().clone() for p in params]
    for a, b, c in zip(results[None], results[True], results[False]):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ defaults


def test_constructor_defaults_are_the_documented_ones():
    p = [torch.nn.Parameter(torch.zeros(2))]
    g = ClippedSGD(p).defaults
    assert (g["lr"], g["max_norm"], g["momentum"], g["weight_decay"]) == (1e-3, 1.0, 0.0, 0.0)
    n = NormalizedSGD(p).defaults
    assert (n["lr"], n["beta"], n["momentum"], n["weight_decay"]) == (1e-3, 1.0, 0.0, 0.0)
    a = ACClip(p).defaults  # the thesis' BERT settings (§4.6.2)
    assert (a["lr"], tuple(a["betas"]), a["alpha"], a["eps"], a["weight_decay"]) == (1e-4, (0.9, 0.99), 1.0, 1e-5,
                                                                                      1e-5)
    i = StochasticINGD(p).defaults  # the thesis' CIFAR-10 settings (§5.6), lr = 1 the plain algorithm
    assert (i["lr"], i["beta"], i["p"], i["q"], i["weight_decay"]) == (1.0, 0.9, 1.0, 10.0, 5e-4)


# ------------------------------------------------------------------------------- statistics at the edges


def _one_step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g, dtype=torch.float64)
    opt.step()
    return {k: float(v) for k, v in opt.last_stats.items()}


@pytest.mark.parametrize("foreach", [True, False])
def test_gclip_below_unit_norm_and_at_zero_gradient(foreach):
    params = [torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64)),
              torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))]
    opt = ClippedSGD(params, lr=0.2, max_norm=0.24, foreach=foreach)
    g = ([0.48, -0.36], 0.0)  # ||g|| = 0.6 < 1, still above tau = 0.24: clipped by 0.4
    stats = _one_step(opt, params, g)
    assert stats["grad_norm"] == pytest.approx(0.6, rel=1e-12)
    assert stats["clip_scale"] == pytest.approx(0.4, rel=1e-6)
    assert stats["post_clip_norm"] == pytest.approx(0.24, rel=1e-6)
    assert stats["clip_fraction"] == 1.0
    torch.testing.assert_close(params[0].detach(), torch.tensor([1.0 - 0.2 * 0.4 * 0.48, -2.0 + 0.2 * 0.4 * 0.36],
                                                                dtype=torch.float64), rtol=1e-12, atol=1e-12)
    stats = _one_step(opt, params, ([0.0, 0.0], 0.0))  # zero gradient: nothing to clip, no 0/0
    assert stats == {"grad_norm": 0.0, "post_clip_norm": 0.0, "clip_scale": 1.0, "clip_fraction": 0.0,
                     "skipped": 0.0}
    single = [torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))]  # one coordinate in all
    opt = ClippedSGD(single, lr=0.1, max_norm=0.25, foreach=foreach)
    assert _one_step(opt, single, (2.0,))["clip_fraction"] == 1.0


@pytest.mark.parametrize("foreach", [True, False])
def test_normalized_sgd_statistics_at_zero_gradient(foreach):
    params = [torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))]
    stats = _one_step(NormalizedSGD(params, lr=0.2, beta=0.7, foreach=foreach), params, ([0.0, 0.0],))
    assert stats["clip_scale"] == pytest.approx(1 / 0.7) and stats["post_clip_norm"] == 0.0
    stats = _one_step(NormalizedSGD(params, lr=0.2, beta=0.0, foreach=foreach), params, ([0.0, 0.0],))
    assert stats["clip_scale"] == 0.0 and stats["post_clip_norm"] == 0.0  # no 0/0: the factor applied is 0
    two = [torch.nn.Parameter(torch.ones(n, dtype=torch.float64)) for n in (2, 3)]
    opt = NormalizedSGD([{"params": [two[0]]}, {"params": [two[1]], "beta": 2.5}], lr=0.2, beta=0.7, foreach=foreach)
    stats = _one_step(opt, two, ([0.0, 0.0], [0.0, 0.0, 0.0]))
    assert stats["clip_scale"] == 0.0 and stats["post_clip_norm"] == 0.0 and stats["grad_norm"] == 0.0
    assert torch.equal(two[1].detach(), torch.ones(3, dtype=torch.float64))
    stats = _one_step(opt, two, ([0.3, 0.0], [0.0, 0.4, 0.0]))  # ||g|| = 0.5, factors 1/1.2 and 1/3
    post = math.sqrt((0.3 / 1.2) ** 2 + (0.4 / 3.0) ** 2)
    assert stats["post_clip_norm"] == pytest.approx(post, rel=1e-6)
    assert stats["clip_scale"] == pytest.approx(post / 0.5, rel=1e-6)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("clip", ["gradient", "momentum"])
def test_cclip_coordinate_exactly_at_tau_is_not_clipped(clip, foreach):
    """CClip's clip_fraction is the share of |g_i| > tau (docstring): a coordinate equal to tau is not counted."""
    params = [torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))]
    opt = ClippedSGD(params, lr=0.5, max_norm=0.25, scope="coordinate", clip=clip, foreach=foreach)
    stats = _one_step(opt, params, ([0.25, -0.25, 0.75, 0.125],))
    assert stats["clip_fraction"] == 0.25
    torch.testing.assert_close(params[0].detach(), torch.tensor([-0.125, 0.125, -0.125, -0.0625], dtype=torch.float64))


@pytest.mark.parametrize("foreach", [True, False])
def test_acclip_adaptive_momentum_exactly_at_tau_is_not_clipped(foreach):
    """Step 1 with beta1 = 0.5, beta2 = 0.75, eps = 0.25: d = eps, tau = d / sqrt(0.25) = 0.5, m = g / 2; a
    coordinate with g = 1 has |m| = tau exactly, its factor min{tau/|m|, 1} is 1: not clipped."""
    params = [torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))]
    opt = ACClip(params, lr=0.125, betas=(0.5, 0.75), eps=0.25, weight_decay=0.0, adaptive=True, foreach=foreach)
    stats = _one_step(opt, params, ([1.0, -1.0, 3.0, 0.5],))
    assert stats["clip_fraction"] == 0.25
    # x = -(2 lr / d) clamp(m, -tau, tau) = -clamp(m, -0.5, 0.5)
    torch.testing.assert_close(params[0].detach(), torch.tensor([-0.5, 0.5, -0.5, -0.25], dtype=torch.float64))
    single = [torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))]  # one coordinate in all, not clipped
    opt = ACClip(single, lr=0.125, betas=(0.5, 0.75), eps=0.25, weight_decay=0.0, adaptive=True, foreach=foreach)
    assert _one_step(opt, single, (0.5,))["clip_fraction"] == 0.0


@pytest.mark.parametrize("foreach", [True, False])
def test_ingd_with_q_zero_and_a_zero_momentum_does_not_move(foreach):
    params = [torch.nn.Parameter(torch.tensor([0.3, -0.7], dtype=torch.float64))]
    opt = StochasticINGD(params, lr=0.5, p=2.0, q=0.0, weight_decay=0.0, seed=1, foreach=foreach)
    assert opt.iterate_swapped_in is False
    stats = _one_step(opt, params, ([0.0, 0.0],))
    assert stats["eta"] == 0.0 and stats["momentum_norm"] == 0.0
    torch.testing.assert_close(params[0].detach(), torch.tensor([0.3, -0.7], dtype=torch.float64), rtol=0, atol=0)
    with opt.swap_iterate():
        assert opt.iterate_swapped_in is True
    assert opt.iterate_swapped_in is False


def test_grad_norm_is_float64_only_when_a_gradient_is():
    a = torch.nn.Parameter(torch.tensor([3.0]))
    b = torch.nn.Parameter(torch.tensor([4.0], dtype=torch.float64))
    for foreach in (True, False):
        opt = ClippedSGD([a, b], lr=0.1, max_norm=10.0, foreach=foreach)
        a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0], dtype=torch.float64)
        opt.step()
        assert opt.last_stats["grad_norm"].dtype == torch.float64 and float(opt.last_stats["grad_norm"]) == 5.0
        opt = ClippedSGD([a], lr=0.1, max_norm=10.0, foreach=foreach)
        a.grad = torch.tensor([3.0])
        opt.step()
        assert opt.last_stats["grad_norm"].dtype == torch.float32


# --------------------------------------------------------------------------------------- state and counters


def test_sgd_family_keeps_no_momentum_buffer_without_momentum():
    for cls, kw in ((ClippedSGD, {}), (ClippedSGD, {"scope": "coordinate"}), (NormalizedSGD, {})):
        p = torch.nn.Parameter(torch.ones(3))
        opt = cls([p], lr=0.1, weight_decay=0.3, **kw)
        p.grad = torch.tensor([0.5, -2.0, 1.0])
        opt.step()
        assert len(opt.state) == 0 or "momentum_buffer" not in opt.state[p], cls


def test_nonfinite_steps_are_counted_and_named_in_the_message():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = ClippedSGD([p], lr=0.1)
    p.grad = torch.ones(2)
    opt.step()
    opt.step()
    for n in (1, 2):
        p.grad = torch.tensor([1.0, float("inf")])
        with pytest.warns(RuntimeWarning) as record:
            opt.step()
        msg = (f"ClippedSGD: non-finite gradient (global norm inf) at step {2 + n}; parameters and optimizer state "
               f"left unchanged; step skipped ({n} skipped so far)")
        assert str(record[0].message) == msg
        assert opt.nonfinite_steps == n and opt.steps == 2
        assert opt.last_stats == {"grad_norm": torch.tensor(math.inf), "skipped": torch.tensor(1.0)}
    strict = NormalizedSGD([p], lr=0.1, nonfinite="raise")
    p.grad = torch.tensor([float("nan"), 1.0])
    with pytest.raises(NonFiniteGradientError, match=re.escape(
            "NormalizedSGD: non-finite gradient (global norm nan) at step 1; parameters and optimizer state left "
            "unchanged (nonfinite='raise')")):
        strict.step()


@pytest.mark.parametrize("cls, kwargs", CONFIGS[::2], ids=IDS[::2])
def test_state_dict_without_the_extra_entry_and_across_dtypes(cls, kwargs):
    gen = torch.Generator().manual_seed(2)
    src = [torch.nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))]
    opt = cls(src, **kwargs)
    for _ in range(2):
        src[0].grad = torch.randn(3, generator=gen, dtype=torch.float64)
        opt.step()
    sd = opt.state_dict()
    assert sd["lightning_opt"]["steps"] == 2
    plain = {k: v for k, v in sd.items() if k != "lightning_opt"}  # a torch.optim-style dict
    dst = [torch.nn.Parameter(src[0].detach().float().clone())]
    other = cls(dst, **kwargs)
    other.load_state_dict(plain)
    assert other.steps == 0 and other.nonfinite_steps == 0
    for key, value in other.state[dst[0]].items():  # float state follows the float32 parameter
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert value.dtype == torch.float32, key
            torch.testing.assert_close(value, sd["state"][0][key].float())
    sd["lightning_opt"] = {}
    other.load_state_dict(sd)
    assert other.steps == 0 and other.nonfinite_steps == 0


def test_no_warning_for_finite_steps():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = ACClip([p], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.grad = torch.ones(2)
        opt.step()
    assert opt.nonfinite_steps == 0 and opt.steps == 1


@pytest.mark.parametrize("cls, kwargs", [(ClippedSGD, dict(lr=0.1, max_norm=0.5, scope="coordinate")),
                                         (ACClip, dict()), (StochasticINGD, dict(seed=1))])
def test_statistics_are_empty_before_the_first_step_and_work_buffers_are_kept(cls, kwargs):
    """A callback may read ``last_stats`` before any step; the foreach paths reuse one buffer per parameter (a
    fresh one only when the parameter's shape or dtype changes)."""
    p = torch.nn.Parameter(torch.ones(3, 2))
    opt = cls([p], **kwargs)
    assert opt.last_stats == {}
    buf = opt._scratch([p])[0]
    assert buf.shape == p.shape and buf.dtype == torch.float32
    p.grad = torch.full_like(p, 0.3)
    opt.step()
    assert opt._scratch([p])[0] is buf
    assert set(opt.last_stats) >= {"grad_norm", "skipped"}
    for shape, dtype in (((4,), torch.float32), ((4,), torch.float64)):  # the shape changes, then the dtype alone
        p.data = torch.ones(shape, dtype=dtype)
        fresh = opt._scratch([p])[0]
        assert fresh is not buf and fresh.shape == shape and fresh.dtype == dtype
        buf = fresh


def test_total_norm_skips_empty_lists_and_widens_to_float64():
    from lightning_opt.optim._tensor_lists import total_norm

    a, b = torch.tensor([3.0]), torch.tensor([4.0, 12.0], dtype=torch.float64)
    assert total_norm([([], True), ([], False)]) is None
    got = total_norm([([], True), ([a], True), ([], False), ([b], False)])
    assert got.dtype == torch.float64 and float(got) == pytest.approx(13.0, rel=1e-12)
