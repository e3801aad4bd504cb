"""Tail-index estimators, bootstrap, α-stable sampler and noise statistics pinned by value against plain-loop
float64 references written from the equations in the docstrings (no ``lightning_opt`` code in the references).

Small asymmetric inputs (a trailing partial block, exact zeros, a block that sums to zero, a dead series, an
odd resample count, level 0.8) so that each branch of the estimators changes the number."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from reference import same

from lightning_opt.stats.bootstrap import bootstrap_interval, percentile_interval, resample_weights
from lightning_opt.stats.noise import b_simple, noise_moments, pool_noise, summarize
from lightning_opt.stats.stable import symmetric_stable
from lightning_opt.stats.tail_index import (
    _hill_inverse_weighted,
    default_block,
    tail_index_hill,
    tail_index_hill_ci,
    tail_index_mohammadi,
    tail_index_mohammadi_ci,
)

NAN = float("nan")



# ------------------------------------------------------------------------------------------- references


def ref_alpha(inv, max_alpha):
    """α = 1/inv when inv is finite and > 0 and α ≤ max_alpha; NaN otherwise."""
    if not (math.isfinite(inv) and inv > 0):
        return NAN
    a = 1.0 / inv
    return a if max_alpha is None or a <= max_alpha else NAN


def ref_mohammadi_diff(series, k1, weights=None):
    """mean_j log|Y_j| − mean_i log|X_i| over the full blocks of one series (zeros and zero sums dropped);
    ``weights`` (one per block) for a bootstrap replicate. NaN when nothing is left."""
    k2 = len(series) // k1
    weights = [1.0] * k2 if weights is None else weights
    ly = cy = lx = cx = 0.0
    for j in range(k2):
        block = series[j * k1:(j + 1) * k1]
        y = sum(block)
        if y != 0:
            ly += weights[j] * math.log(abs(y))
            cy += weights[j]
        for v in block:
            if v != 0:
                lx += weights[j] * math.log(abs(v))
                cx += weights[j]
    if cy == 0 or cx == 0:
        return NAN
    return ly / cy - lx / cx


def ref_mohammadi_inv(columns, k1, weights=None):
    """Pooled 1/α̂ over series (columns): the mean of the finite per-series differences, over log K1."""
    diffs = [ref_mohammadi_diff(c, k1, weights) for c in columns]
    ok = [d for d in diffs if math.isfinite(d)]
    return (sum(ok) / len(ok) if ok else NAN) / math.log(k1)


def ref_hill_inv(values, k):
    s = sorted((abs(v) for v in values), reverse=True)
    if s[k] == 0:
        return math.inf
    return sum(math.log(v) for v in s[:k]) / k - math.log(s[k])


def ref_percentiles(reps, level):
    """Linear-interpolation percentiles of the finite replicates; NaN when fewer than half are finite."""
    fin = [r for r in reps if math.isfinite(r)]
    if 2 * len(fin) < len(reps):
        return NAN, NAN
    lo, hi = np.quantile(np.array(fin, dtype=np.float64), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def ref_counts(n, reps, seed):
    """Multinomial counts of ``reps`` rows of n draws with replacement, drawn with torch.randint from ``seed``."""
    idx = torch.randint(n, (reps, n), generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for row in idx:
        c = [0.0] * n
        for i in row:
            c[i] += 1.0
        out.append(c)
    return out


def _data(n, seed, zeros=()):
    x = symmetric_stable(1.3, n, generator=torch.Generator().manual_seed(seed))
    x[list(zeros)] = 0.0
    return x


# ---------------------------------------------------------------------------------------- Mohammadi


@pytest.mark.parametrize("n, block, zeros", [(23, 4, (2, 9)), (50, None, (0, 31, 49)), (40, 3, ())])
def test_mohammadi_across_coordinates_matches_reference(n, block, zeros):
    x = _data(n, n, zeros)
    k1 = math.isqrt(n) if block is None else block
    inv = ref_mohammadi_inv([x.tolist()], k1)
    assert math.isfinite(inv) and inv > 0  # the case is in range, so the value is compared
    got = tail_index_mohammadi(x.reshape(-1, 1) if n == 40 else x, block, max_alpha=None)
    assert got.dtype == torch.float64 and got.shape == ()
    assert same(got, 1.0 / inv)
    # max_alpha is an inclusive bound: exactly at the estimate it is kept, just below it is NaN
    at = float(got)
    assert same(tail_index_mohammadi(x, block, max_alpha=at), at)
    assert math.isnan(tail_index_mohammadi(x, block, max_alpha=at * (1 - 1e-9)))
    # float32 input: computed in float64 from the float32 values
    x32 = x.float()
    got32 = tail_index_mohammadi(x32, block, max_alpha=None)
    assert same(got32, 1.0 / ref_mohammadi_inv([x32.double().tolist()], k1))


def test_mohammadi_per_series_matches_reference():
    n, c, k1 = 17, 5, 3  # 5 full blocks and 2 trailing samples dropped, per series
    g = torch.Generator().manual_seed(4)
    x = symmetric_stable(1.6, (n, c), generator=g)
    x[:, 1] = 0.0  # a dead series: left out of the pool
    x[4, 2] = 0.0  # one zero sample
    x[0, 3], x[1, 3], x[2, 3] = 0.7, -0.7, 0.0  # a block that sums to exactly zero
    cols = [x[:, j].tolist() for j in range(c)]
    inv = ref_mohammadi_inv(cols, k1)
    assert math.isfinite(inv) and inv > 0
    for xx, dim in ((x, 0), (x.T.contiguous(), 1), (x.T.contiguous(), -1), (x.reshape(n, 1, c), 0)):
        assert same(tail_index_mohammadi(xx, k1, dim, max_alpha=None), 1.0 / inv), dim
    # ``dim=None`` flattens instead: a different number
    flat = ref_mohammadi_inv([x.reshape(-1).tolist()], k1)
    assert same(tail_index_mohammadi(x, k1, max_alpha=None), ref_alpha(flat, None))


def _pair_inverse(c):
    """1/α̂ of blocks (1, −c) with K1 = 2: (log|1 − c| − ½ log c) / log 2."""
    return (math.log(abs(1 - c)) - 0.5 * math.log(c)) / math.log(2)


def _pairs_with_alpha(alpha):
    lo, hi = 3.0, 100.0  # 1/α̂ grows with c on [3, ∞)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _pair_inverse(mid) < 1 / alpha else (lo, mid)
    c = 0.5 * (lo + hi)
    return torch.tensor([1.0, -c] * 6, dtype=torch.float64), 1 / _pair_inverse(c)


@pytest.mark.parametrize("alpha", [2.2, 3.0])
def test_mohammadi_default_range_keeps_up_to_two_and_a_half(alpha):
    x, a = _pairs_with_alpha(alpha)
    assert same(tail_index_mohammadi(x, 2, max_alpha=None), a)
    assert same(tail_index_mohammadi(x, 2), ref_alpha(1 / a, 2.5))
    assert same(tail_index_mohammadi(x, 2, max_alpha=2.0), NAN)
    assert same(tail_index_mohammadi_ci(x, 2, num_resamples=5).alpha, ref_alpha(1 / a, 2.5))


def test_mohammadi_negative_inverse_is_nan():
    x = torch.tensor([1.0, -2.0] * 5, dtype=torch.float64)  # |Y| = 1 < √2: 1/α̂ < 0
    assert _pair_inverse(2.0) < 0
    assert math.isnan(tail_index_mohammadi(x, 2, max_alpha=None))


def test_mohammadi_block_and_dim_arguments():
    x = _data(9, 1)
    assert same(tail_index_mohammadi(x, 9, max_alpha=None), ref_alpha(ref_mohammadi_inv([x.tolist()], 9), None))
    for bad in (1, 0, True, 2.0, 10):
        with pytest.raises(ValueError):
            tail_index_mohammadi(x, bad)
    assert same(tail_index_mohammadi(x, 2, max_alpha=None), ref_alpha(ref_mohammadi_inv([x.tolist()], 2), None))
    y = x.reshape(3, 3)
    for bad in (2, -3):
        with pytest.raises(ValueError, match="dim"):
            tail_index_mohammadi(y, 2, bad)
    with pytest.raises(ValueError, match="dim"):
        tail_index_mohammadi(torch.tensor(1.0), 2, 0)
    assert same(tail_index_mohammadi(y, 2, -2, max_alpha=None), tail_index_mohammadi(y, 2, 0, max_alpha=None))
    xl = x.float().tolist()  # a list becomes a default-dtype (float32) tensor: use values float32 holds exactly
    assert same(tail_index_mohammadi(xl, 3, max_alpha=None), ref_alpha(ref_mohammadi_inv([xl], 3), None))
    for bad in (0.0, -1.0, NAN):
        with pytest.raises(ValueError, match="max_alpha"):
            tail_index_mohammadi(x, 3, max_alpha=bad)
        with pytest.raises(ValueError, match="max_alpha"):
            tail_index_mohammadi_ci(x, 3, max_alpha=bad)
        with pytest.raises(ValueError, match="max_alpha"):
            tail_index_hill(x, max_alpha=bad)
        with pytest.raises(ValueError, match="max_alpha"):
            tail_index_hill_ci(x, max_alpha=bad)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 8, 9, 15, 16, 99, 100, 10_000])
def test_default_block_is_floor_sqrt_at_least_two(n):
    assert default_block(n) == max(2, int(math.floor(math.sqrt(n) + 1e-9)))


@pytest.mark.parametrize("dim", [None, 1])
def test_mohammadi_ci_matches_reference(dim):
    k1, reps, level, seed = 3, 37, 0.8, 21
    x = symmetric_stable(1.4, (4, 20), generator=torch.Generator().manual_seed(8))  # 4 series × 20 samples
    x[2, 5] = 0.0
    cols = [x[i].tolist() for i in range(4)] if dim == 1 else [x.reshape(-1).tolist()]
    k2 = len(cols[0]) // k1
    w = ref_counts(k2, reps, seed)
    inv = [ref_mohammadi_inv(cols, k1, w[r]) for r in range(reps)]
    q_lo, q_hi = ref_percentiles(inv, level)
    est = tail_index_mohammadi_ci(x, k1, dim, num_resamples=reps, level=level,
                                  generator=torch.Generator().manual_seed(seed), max_alpha=None)
    assert same(est.alpha, ref_alpha(ref_mohammadi_inv(cols, k1), None))
    assert same(est.lo, ref_alpha(q_hi, None)) and same(est.hi, ref_alpha(q_lo, None))
    assert float(est.lo) < float(est.hi)
    # with a bound between the two ends, only the end above it is NaN
    cut = 0.5 * (float(est.lo) + float(est.hi))
    bounded = tail_index_mohammadi_ci(x, k1, dim, num_resamples=reps, level=level,
                                      generator=torch.Generator().manual_seed(seed), max_alpha=cut)
    assert same(bounded.lo, est.lo) and math.isnan(bounded.hi)


# ---------------------------------------------------------------------------------------------- Hill


@pytest.mark.parametrize("n, k, zeros", [(30, None, ()), (10, 3, (1, 7)), (12, 11, ()), (26, 1, (0,))])
def test_hill_matches_reference(n, k, zeros):
    x = _data(n, 100 + n, zeros)
    kk = math.isqrt(n) if k is None else k
    inv = ref_hill_inv(x.tolist(), kk)
    got = tail_index_hill(x, k)
    assert got.dtype == torch.float64
    assert same(got, ref_alpha(inv, None))
    at = float(got)
    assert same(tail_index_hill(x, k, max_alpha=at), at)
    assert math.isnan(tail_index_hill(x, k, max_alpha=at * (1 - 1e-9)))


def test_hill_zero_threshold_and_k_range():
    x = torch.tensor([3.0, -0.5, 0.0, 0.0, 2.0], dtype=torch.float64)
    assert same(tail_index_hill(x, 2), ref_alpha(ref_hill_inv(x.tolist(), 2), None))
    assert math.isnan(tail_index_hill(x, 3))  # X_(k+1) = 0
    assert same(tail_index_hill(x.tolist(), 1), ref_alpha(ref_hill_inv(x.tolist(), 1), None))
    assert same(tail_index_hill(x[:2], None), ref_alpha(ref_hill_inv(x[:2].tolist(), 1), None))  # k = max(1, 1)
    for bad in (0, 5, 6, True, 2.0):
        with pytest.raises(ValueError, match="k"):
            tail_index_hill(x, bad)
    assert same(tail_index_hill(x, 4), NAN)
    with pytest.raises(ValueError, match="k"):
        tail_index_hill(x[:1])  # one sample: no k < n


def _ref_hill_weighted(s, k, w):
    """Hill's 1/α̂ on the resample that holds w_i copies of s_i (s sorted descending)."""
    sample = [v for v, c in zip(s, w) for _ in range(int(c))]
    assert len(sample) > k
    return ref_hill_inv(sample, k)


def test_hill_weighted_inverse_matches_expanded_resamples():
    s = torch.tensor([5.0, 3.0, 3.0, 1.5, 0.8, 0.0], dtype=torch.float64)
    w = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 2, 1, 0, 3, 0], [3, 0, 0, 2, 0, 1], [0, 0, 1, 1, 1, 3],
                      [6, 0, 0, 0, 0, 0], [0, 0, 0, 0, 2, 4]], dtype=torch.float64)
    for k in (1, 2, 3):
        got = _hill_inverse_weighted(s, k, w)
        for r in range(w.shape[0]):
            want = _ref_hill_weighted(s.tolist(), k, w[r].tolist())
            assert same(got[r], want), (k, r, float(got[r]), want)


@pytest.mark.parametrize("n, k, reps", [(40, None, 23), (15, 4, 8)])
def test_hill_ci_matches_reference(n, k, reps):
    level, seed = 0.8, 5
    x = _data(n, 7 * n, (3,))
    kk = math.isqrt(n) if k is None else k
    s = sorted((abs(v) for v in x.tolist()), reverse=True)
    counts = ref_counts(n, reps, seed)
    inv = [_ref_hill_weighted(s, kk, c) for c in counts]
    q_lo, q_hi = ref_percentiles(inv, level)
    est = tail_index_hill_ci(x, k, num_resamples=reps, level=level, generator=torch.Generator().manual_seed(seed))
    assert same(est.alpha, ref_alpha(ref_hill_inv(x.tolist(), kk), None))
    assert same(est.lo, ref_alpha(q_hi, None)) and same(est.hi, ref_alpha(q_lo, None))
    cut = 0.5 * (float(est.lo) + float(est.hi))
    bounded = tail_index_hill_ci(x, k, num_resamples=reps, level=level,
                                 generator=torch.Generator().manual_seed(seed), max_alpha=cut)
    assert same(bounded.lo, est.lo) and math.isnan(bounded.hi) and math.isnan(bounded.alpha) == (
        float(est.alpha) > cut)


def test_hill_ci_in_chunks_equals_one_batch_of_resamples():
    """n large enough that the [R, n] weights are built in chunks (4e6 entries each): the replicates are the
    same as from one [R, n] draw of the same generator."""
    n, reps, level = 1_000_003, 5, 0.6  # chunk = 3: two draws of 3 and 2 rows
    x = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    k = 1000
    s = torch.sort(x.abs(), descending=True).values
    w = resample_weights(n, reps, generator=torch.Generator().manual_seed(9))
    inv = _hill_inverse_weighted(s, k, w).tolist()
    q_lo, q_hi = ref_percentiles(inv, level)
    est = tail_index_hill_ci(x, k, num_resamples=reps, level=level, generator=torch.Generator().manual_seed(9))
    assert same(est.lo, 1 / q_hi) and same(est.hi, 1 / q_lo)


# ----------------------------------------------------------------------------------------- bootstrap


def test_resample_weights_are_counts_of_uniform_draws():
    w = resample_weights(7, 11, generator=torch.Generator().manual_seed(3))
    assert w.shape == (11, 7) and w.dtype == torch.float64
    assert w.tolist() == ref_counts(7, 11, 3)
    w32 = resample_weights(7, 11, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    assert w32.dtype == torch.float32 and w32.tolist() == ref_counts(7, 11, 3)
    assert resample_weights(1, 2).tolist() == [[1.0], [1.0]]
    for n, r in ((0, 3), (-1, 3), (3, 0)):
        with pytest.raises(ValueError):
            resample_weights(n, r)


@pytest.mark.parametrize("n_bad", [0, 3, 4, 5])
def test_percentile_interval_matches_reference(n_bad):
    level = 0.7
    vals = [0.3, 1.7, -0.4, 2.2, 0.9, 1.1, 0.05, 3.0]
    bad = [NAN, math.inf, -math.inf, NAN, math.inf][:n_bad]
    reps = vals + bad  # 8 finite among 8 + n_bad: "enough" while 2·8 ≥ 8 + n_bad
    lo, hi = percentile_interval(torch.tensor(reps, dtype=torch.float32), level)
    want = ref_percentiles(reps, level)
    assert lo.dtype == torch.float64
    assert same(lo, want[0], 1e-6) and same(hi, want[1], 1e-6)
    lo9, hi9 = percentile_interval(torch.tensor(vals, dtype=torch.float64))
    want9 = ref_percentiles(vals, 0.9)
    assert same(lo9, want9[0]) and same(hi9, want9[1])
    for bad_level in (0.0, 1.0):
        with pytest.raises(ValueError, match="level"):
            percentile_interval(torch.tensor(vals), bad_level)


def test_percentile_interval_needs_half_finite():
    reps = [1.0, 2.0, 3.0, NAN, NAN, math.inf, 0.5]  # 4 of 7 finite: enough
    assert all(math.isfinite(float(b)) for b in percentile_interval(torch.tensor(reps), 0.5))
    reps = [1.0, 2.0, 3.0, NAN, NAN, math.inf, -math.inf]  # 3 of 7: not enough
    assert all(math.isnan(float(b)) for b in percentile_interval(torch.tensor(reps), 0.5))


def test_bootstrap_interval_of_a_weighted_mean():
    data = torch.tensor([0.3, -1.2, 2.5, 0.7, 4.1, -0.2], dtype=torch.float64)
    reps, level, seed = 19, 0.6, 13
    counts = ref_counts(6, reps, seed)
    means = [sum(c * d for c, d in zip(row, data.tolist())) / 6 for row in counts]
    lo, hi = bootstrap_interval(lambda w: w @ data / 6, 6, num_resamples=reps, level=level,
                                generator=torch.Generator().manual_seed(seed))
    want = ref_percentiles(means, level)
    assert same(lo, want[0]) and same(hi, want[1])
    for kwargs in ({"num_resamples": 0}, {"level": 1.0}, {"level": 0.0}):
        with pytest.raises(ValueError):
            bootstrap_interval(lambda w: w @ data, 6, **kwargs)


# ---------------------------------------------------------------------------------------- the sampler


@pytest.mark.parametrize("alpha, scale", [(1.3, 0.7), (1.0, 2.5), (2.0, 1.0), (0.6, 1.0)])
def test_stable_sampler_is_the_cms_formula(alpha, scale):
    shape = (3, 4)
    g = torch.Generator().manual_seed(17)
    u = torch.rand(shape, generator=g, dtype=torch.float64).reshape(-1).tolist()
    w = torch.empty(shape, dtype=torch.float64).exponential_(1.0, generator=g).reshape(-1).tolist()
    want = []
    for ui, wi in zip(u, w):
        v = math.pi * (ui - 0.5)
        if alpha == 1.0:
            want.append(scale * math.tan(v))
            continue
        x = (math.sin(alpha * v) / math.cos(v) ** (1 / alpha)
             * (math.cos((1 - alpha) * v) / wi) ** ((1 - alpha) / alpha))
        want.append(scale * x)
    got = symmetric_stable(alpha, shape, scale=scale, generator=torch.Generator().manual_seed(17))
    assert got.shape == shape and got.dtype == torch.float64
    for a, b in zip(got.reshape(-1).tolist(), want):
        assert same(a, b, 1e-9)
    one = symmetric_stable(alpha, 5, scale=scale, generator=torch.Generator().manual_seed(17), dtype=torch.float32)
    assert one.shape == (5,) and one.dtype == torch.float32


def test_stable_sampler_argument_ranges():
    assert symmetric_stable(2.0, 2).shape == (2,)
    for kwargs in ({"alpha": -0.5}, {"alpha": 2.0000001}, {"scale": -1.0}, {"scale": math.inf},
                   {"scale": NAN}, {"dtype": torch.int64}):
        args = {"alpha": 1.5, "size": 4} | kwargs
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            symmetric_stable(**args)


# ------------------------------------------------------------------------------------------ noise


def _ref_moments(rows):
    m, d = len(rows), len(rows[0])
    mean = [sum(r[j] for r in rows) / m for j in range(d)]
    xi = [[r[j] - mean[j] for j in range(d)] for r in rows]
    norms = [math.sqrt(sum(v * v for v in x)) for x in xi]
    return xi, norms, sum(n * n for n in norms), sum(v * v for v in mean)


@pytest.mark.parametrize("center", [True, False])
def test_noise_moments_match_reference(center):
    g = torch.Generator().manual_seed(2)
    grads = torch.randn(5, 7, generator=g, dtype=torch.float64) + torch.linspace(-1, 2, 7, dtype=torch.float64)
    raw = grads.clone()
    xi, norms, sum_sq, mean_sq = _ref_moments(raw.tolist())
    mom = noise_moments(grads, center=center)
    assert mom.count == 5 and mom.norms.dtype == torch.float64
    assert all(same(a, b) for a, b in zip(mom.norms.tolist(), norms))
    assert same(mom.sum_sq, sum_sq) and same(mom.mean_sq, mean_sq)
    want = torch.tensor(xi, dtype=torch.float64) if center else raw
    torch.testing.assert_close(grads, want, rtol=1e-12, atol=1e-12)
    for bad in (torch.zeros(1, 3), torch.zeros(4)):
        with pytest.raises(ValueError):
            noise_moments(bad)
    assert noise_moments(torch.zeros(2, 3)).count == 2


def test_pool_noise_over_groups_matches_reference():
    count, b = 4, 3
    g = torch.Generator().manual_seed(6)
    groups = [torch.randn(count, 9, generator=g, dtype=torch.float64) * s + 0.4 * s for s in (0.5, 1.0, 2.0)]
    refs = [_ref_moments(x.tolist()) for x in groups]
    trace = sum(r[2] for r in refs) / (len(refs) * (count - 1))
    grad_sq = sum(r[3] - r[2] / (count * (count - 1)) for r in refs) / len(refs)
    assert grad_sq > 0
    moms = [noise_moments(x.clone()) for x in groups]
    out = pool_noise(torch.stack([m.sum_sq for m in moms]).float(), torch.stack([m.mean_sq for m in moms]).float(),
                     count, b)
    assert out.trace.dtype == torch.float64
    assert same(out.trace, trace, 1e-6) and same(out.sigma, math.sqrt(trace), 1e-6)
    assert same(out.grad_sq, grad_sq, 1e-5) and same(out.b_simple, b * trace / grad_sq, 1e-5)
    one = summarize(groups[1], b)
    r = refs[1]
    assert same(one.trace, r[2] / (count - 1)) and same(one.grad_sq, r[3] - r[2] / (count * (count - 1)))
    assert same(one.b_simple, ref_b_simple(r[2] / (count - 1), r[3] - r[2] / (count * (count - 1)), b))
    assert torch.equal(groups[1], torch.tensor(groups[1].tolist(), dtype=torch.float64))  # input left as it was
    assert same(pool_noise(torch.tensor(2.0), torch.tensor(5.0), 2, 1).grad_sq, 5.0 - 2.0 / 2)
    for count_, bs in ((1, 3), (4, 0)):
        with pytest.raises(ValueError):
            pool_noise(torch.tensor(1.0), torch.tensor(1.0), count_, bs)


def ref_b_simple(trace, grad_sq, b):
    if not grad_sq > 0:
        return NAN
    v = b * trace / grad_sq
    return v if math.isfinite(v) else NAN


@pytest.mark.parametrize("trace, grad_sq", [(2.0, 0.3), (2.0, 0.0), (2.0, -0.1), (2.0, 1e-320), (math.inf, 1.0),
                                            (0.0, 0.5)])
def test_b_simple_matches_reference(trace, grad_sq):
    got = b_simple(torch.tensor(trace, dtype=torch.float64), torch.tensor(grad_sq, dtype=torch.float64), 7)
    assert same(got, ref_b_simple(trace, grad_sq, 7))


# ------------------------------------------------------------------------------- messages and edges


def _invalid(owner, name, value, expected):
    prefix = f"{owner}: " if owner else ""
    return "^" + re.escape(f"{prefix}invalid {name}={value!r}; expected {expected}") + "$"


@pytest.mark.parametrize("call, match", [
    (lambda: symmetric_stable(2.5, 3), _invalid("symmetric_stable", "alpha", 2.5, "a number with alpha in (0, 2]")),
    (lambda: symmetric_stable(1.5, 3, scale=-2.0),
     _invalid("symmetric_stable", "scale", -2.0, "a finite number with scale > 0")),
    (lambda: symmetric_stable(1.5, 3, dtype=torch.int32),
     _invalid("symmetric_stable", "dtype", torch.int32, "a floating-point torch dtype")),
    (lambda: resample_weights(0, 3), _invalid("resample_weights", "n", 0, "an int with n >= 1")),
    (lambda: resample_weights(3, 0), _invalid("bootstrap", "num_resamples", 0, "an int with num_resamples >= 1")),
    (lambda: percentile_interval(torch.ones(3), 1.5),
     _invalid("bootstrap", "level", 1.5, "a finite number with level in (0, 1)")),
    (lambda: pool_noise(torch.tensor(1.0), torch.tensor(1.0), 1, 3),
     _invalid("pool_noise", "count", 1, "count >= 2 gradients per group")),
    (lambda: pool_noise(torch.tensor(1.0), torch.tensor(1.0), 2, 0),
     _invalid("pool_noise", "batch_size", 0, "batch_size >= 1")),
    (lambda: tail_index_mohammadi(torch.ones(9), max_alpha=-1.0),
     _invalid("tail_index_mohammadi", "max_alpha", -1.0, "None or a number > 0")),
    (lambda: tail_index_mohammadi_ci(torch.ones(9), max_alpha=0.0),
     _invalid("tail_index_mohammadi_ci", "max_alpha", 0.0, "None or a number > 0")),
    (lambda: tail_index_hill(torch.ones(9), max_alpha=-2.0),
     _invalid("tail_index_hill", "max_alpha", -2.0, "None or a number > 0")),
    (lambda: tail_index_hill_ci(torch.ones(9), max_alpha=-3.0),
     _invalid("tail_index_hill_ci", "max_alpha", -3.0, "None or a number > 0")),
    (lambda: tail_index_mohammadi(torch.ones(9), 1),
     _invalid("tail_index_mohammadi", "block", 1, "None or an int with block >= 2")),
    (lambda: tail_index_mohammadi_ci(torch.ones(9), 1),
     _invalid("tail_index_mohammadi_ci", "block", 1, "None or an int with block >= 2")),
    (lambda: tail_index_hill(torch.ones(9), 9), _invalid("tail_index_hill", "k", 9,
                                                        "None or an int with 1 <= k < n = 9 samples")),
    # the interval checks k itself before the point estimate: the message names the function called
    (lambda: tail_index_hill_ci(torch.ones(9), 0), _invalid("tail_index_hill_ci", "k", 0,
                                                        "None or an int with 1 <= k < n = 9 samples")),
])
def test_argument_errors_name_the_function_argument_value_and_range(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_interval_edges_half_finite_default_resamples_and_one_dimensional_dim():
    lo, hi = percentile_interval(torch.tensor([1.0, 2.0, 3.0, 4.0, NAN, NAN, math.inf, -math.inf]), 0.5)  # 4 of 8
    want = ref_percentiles([1.0, 2.0, 3.0, 4.0], 0.5)
    assert same(lo, want[0]) and same(hi, want[1])
    x = _data(60, 3, (4,))
    s = sorted((abs(v) for v in x.tolist()), reverse=True)
    inv = [_ref_hill_weighted(s, 7, c) for c in ref_counts(60, 200, 2)]  # the default: 200 resamples
    q_lo, q_hi = ref_percentiles(inv, 0.9)
    est = tail_index_hill_ci(x, generator=torch.Generator().manual_seed(2))
    assert same(est.lo, ref_alpha(q_hi, None)) and same(est.hi, ref_alpha(q_lo, None))
    below = 0.5 * float(est.lo)  # a bound below both ends: both NaN
    est = tail_index_hill_ci(x, generator=torch.Generator().manual_seed(2), max_alpha=below)
    assert math.isnan(est.lo) and math.isnan(est.hi) and math.isnan(est.alpha)
    y = _data(40, 5)
    k2 = 40 // 6
    inv = [ref_mohammadi_inv([y.tolist()], 6, c) for c in ref_counts(k2, 200, 4)]
    q_lo, q_hi = ref_percentiles(inv, 0.9)
    est = tail_index_mohammadi_ci(y, 6, 0, generator=torch.Generator().manual_seed(4), max_alpha=None)
    assert same(est.lo, ref_alpha(q_hi, None)) and same(est.hi, ref_alpha(q_lo, None))
    assert same(tail_index_mohammadi(y, 6, 0, max_alpha=None), tail_index_mohammadi(y, 6, max_alpha=None))
