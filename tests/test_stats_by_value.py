"""``stats.averages`` and ``stats.smoothness`` pinned by value against float64 references written from their
docstrings: Student-t from scipy, batch means / Cesàro / windowed averages and the (L0, L1) least-squares fit from
plain loops over the samples (no ``lightning_opt`` code in the references)."""

from __future__ import annotations

import math

import pytest
import torch
from reference import same
from scipy import stats as sps

from lightning_opt.stats.averages import (
    BatchMeansWindow,
    CesaroAverage,
    WindowedAverage,
    batch_means_ci,
    student_t_abs_cdf,
    t_critical,
)
from lightning_opt.stats.smoothness import L0L1Fit, clipping_advice, directional_curvature, local_smoothness

NAN = float("nan")



# ------------------------------------------------------------------------------------------- Student t


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 6, 7, 12, 31])
def test_student_t_abs_cdf_matches_scipy(df):
    for t in (0.05, 0.4, 1.0, 1.7, 3.2, 11.0, 250.0):
        assert same(student_t_abs_cdf(t, df), 2 * sps.t.cdf(t, df) - 1, 1e-11), (t, df)
    assert student_t_abs_cdf(0.0, df) == 0.0 and student_t_abs_cdf(-1.5, df) == 0.0
    assert student_t_abs_cdf(math.inf, df) == 1.0


@pytest.mark.parametrize("df", [1, 2, 3, 6, 9, 40])
def test_t_critical_matches_scipy(df):
    for conf in (0.5, 0.8, 0.95, 0.999):
        assert same(t_critical(conf, df), sps.t.ppf((1 + conf) / 2, df), 1e-10), (conf, df)


def test_t_critical_uses_the_normal_quantile_above_1e5_degrees_of_freedom():
    assert same(t_critical(0.9, 100_001), sps.norm.ppf(0.95), 1e-12)
    assert same(t_critical(0.9, 100_000), sps.t.ppf(0.95, 100_000), 1e-10)  # still the t quantile at 1e5
    assert not same(t_critical(0.9, 100_000), sps.norm.ppf(0.95), 1e-7)
    for bad in ({"confidence": 0.0, "df": 3}, {"confidence": 1.0, "df": 3}, {"confidence": 0.9, "df": 0}):
        with pytest.raises(ValueError):
            t_critical(**bad)
    with pytest.raises(ValueError):
        student_t_abs_cdf(1.0, 0)


# ------------------------------------------------------------------------------------------ batch means


def ref_batch_means(xs, b, conf):
    xs = [float(v) for v in xs if math.isfinite(float(v))]
    if not xs:
        return NAN, NAN, NAN
    m = len(xs) // b
    if m == 0:
        return sum(xs) / len(xs), NAN, NAN
    used = xs[len(xs) - m * b:]
    means = [sum(used[j * m:(j + 1) * m]) / m for j in range(b)]
    grand = sum(means) / b
    s2 = sum((y - grand) ** 2 for y in means) / (b - 1)
    half = sps.t.ppf((1 + conf) / 2, b - 1) * math.sqrt(s2 / b)
    return grand, grand - half, grand + half


@pytest.mark.parametrize("n, b, conf", [(23, 4, 0.8), (12, 3, 0.95), (5, 2, 0.9), (3, 4, 0.9), (4, 4, 0.7)])
def test_batch_means_ci_matches_reference(n, b, conf):
    g = torch.Generator().manual_seed(n)
    xs = (torch.randn(n, generator=g, dtype=torch.float64) + torch.arange(n) * 0.3).tolist()
    xs[1] = NAN if n > 4 else xs[1]  # a non-finite sample is dropped first
    got = batch_means_ci(xs, b, conf)
    want = ref_batch_means(xs, b, conf)
    assert all(same(a, w, 1e-10) for a, w in zip(got, want)), (got, want)
    got_t = batch_means_ci(torch.tensor(xs, dtype=torch.float64), b, conf)
    assert all(same(a, w, 1e-10) for a, w in zip(got_t, want))


def test_batch_means_ci_edge_cases():
    assert all(math.isnan(v) for v in batch_means_ci([NAN, math.inf], 2))
    assert all(math.isnan(v) for v in batch_means_ci([], 2))
    for bad in ({"n_batches": 1}, {"confidence": 1.0}, {"confidence": 0.0}, {"confidence": 1.5}):
        for xs in ([1.0, 2.0, 3.0], [1.0], []):  # also where no t quantile is needed
            with pytest.raises(ValueError, match=next(iter(bad))):
                batch_means_ci(xs, **({"n_batches": 2} | bad))


def test_batch_means_window_matches_reference():
    win = BatchMeansWindow(7, 3)
    assert len(win) == 0 and not win.full and math.isnan(win.mean())
    xs = [0.4, 2.0, NAN, -1.0, 3.5, math.inf, 0.25, 1.5, 2.5, -0.75, 4.0, 1.0]
    finite = []
    for i, x in enumerate(xs):
        win.update(torch.tensor(x) if i % 2 else x)
        if math.isfinite(x):
            finite.append(x)
        kept = finite[-7:]
        assert win.values() == pytest.approx(kept) and len(win) == len(kept)
        assert win.full == (len(kept) == 7)
        assert same(win.mean(), sum(kept) / len(kept), 1e-7)
    assert win.skipped == 2
    for got, want in zip(win.ci(0.8), ref_batch_means(finite[-7:], 3, 0.8)):
        assert same(got, want, 1e-6)
    for got, want in zip(win.ci(), ref_batch_means(finite[-7:], 3, 0.95)):
        assert same(got, want, 1e-6)
    state = win.state_dict()
    assert state == {"window": 7, "n_batches": 3, "values": win.values(), "skipped": 2}
    other = BatchMeansWindow(7, 3)
    other.load_state_dict(state)
    assert other.values() == win.values() and other.skipped == 2 and other.full
    other.update(9.0)
    assert other.values() == win.values()[1:] + [9.0]
    for w, b in ((6, 3), (7, 2)):
        with pytest.raises(ValueError, match="window"):
            BatchMeansWindow(w, b).load_state_dict(state)
    win.reset()
    assert len(win) == 0 and win.skipped == 0
    assert len(BatchMeansWindow(3, 3)) == 0
    for w, b in ((2, 3), (3, 1)):
        with pytest.raises(ValueError):
            BatchMeansWindow(w, b)


# ------------------------------------------------------------------------------- device-side averages


SAMPLES = [[[0.5, NAN, 2.0], [1.0, -1.0, math.inf]],
           [[1.5, 2.0, -4.0], [NAN, 3.0, 0.5]],
           [[-0.25, 1.0, 0.0], [2.0, -math.inf, 7.0]],
           [[3.0, 0.5, 1.0], [4.0, 1.0, NAN]],
           [[2.0, 2.0, 2.5], [0.5, 0.25, 1.0]]]


def ref_elementwise_mean(samples):
    """Per entry: the mean of the finite values among ``samples`` (NaN where none), and the non-finite count."""
    out, skipped = [], []
    for i in range(2):
        row, srow = [], []
        for j in range(3):
            vals = [s[i][j] for s in samples if math.isfinite(s[i][j])]
            row.append(sum(vals) / len(vals) if vals else NAN)
            srow.append(sum(1 for s in samples if not math.isfinite(s[i][j])))
        out.append(row)
        skipped.append(srow)
    return out, skipped


def _close_grid(got, want, rel=1e-12):
    return all(same(a, b, rel) for ra, rb in zip(got.tolist(), want) for a, b in zip(ra, rb))


def test_cesaro_average_matches_reference():
    avg = CesaroAverage((2, 3), dtype=torch.float32)
    assert all(math.isnan(v) for v in avg.mean().reshape(-1).tolist())
    for k, s in enumerate(SAMPLES, 1):
        avg.update(torch.tensor(s, dtype=torch.float64) if k % 2 else s)
        mean, skipped = ref_elementwise_mean(SAMPLES[:k])
        assert avg.mean().dtype == torch.float32 and _close_grid(avg.mean(), mean, 1e-6)
        assert avg.skipped.tolist() == skipped and avg.count.dtype == torch.int64
    state = avg.state_dict()
    assert state["shape"] == [2, 3]
    other = CesaroAverage([2, 3], dtype=torch.float32)
    other.load_state_dict(state)
    assert torch.equal(other.mean(), avg.mean()) and torch.equal(other.skipped, avg.skipped)
    state["total"].zero_()  # the loaded state is a copy
    assert torch.equal(other.mean(), avg.mean())
    with pytest.raises(ValueError, match="shape"):
        CesaroAverage(3).load_state_dict(avg.state_dict())
    with pytest.raises(ValueError, match="shape"):
        avg.update(torch.zeros(3, 2))
    assert avg.to("cpu") is avg and avg.total.device.type == "cpu"
    avg.reset()
    assert avg.count.sum() == 0 and avg.skipped.sum() == 0 and avg.total.abs().sum() == 0
    scalar = CesaroAverage()
    for v in (0.3, NAN, 1.1, -0.2):
        scalar.update(v)
    assert scalar.mean().shape == () and same(scalar.mean(), (0.3 + 1.1 - 0.2) / 3)
    assert scalar.mean().dtype == torch.float64 and int(scalar.skipped) == 1


@pytest.mark.parametrize("window", [1, 2, 3, 7])
def test_windowed_average_matches_reference(window):
    avg = WindowedAverage(window, [2, 3])
    for k, s in enumerate(SAMPLES, 1):
        avg.update(torch.tensor(s, dtype=torch.float32) if k % 2 else s)
        mean, _ = ref_elementwise_mean(SAMPLES[max(0, k - window):k])
        _, skipped = ref_elementwise_mean(SAMPLES[:k])
        assert _close_grid(avg.mean(), mean, 1e-7), (window, k)
        assert avg.skipped.tolist() == skipped
        assert avg.seen == k and avg.pos == k % window
    state = avg.state_dict()
    other = WindowedAverage(window, (2, 3))
    other.load_state_dict(state)
    assert other.pos == avg.pos and other.seen == avg.seen and torch.equal(other.skipped, avg.skipped)
    extra = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    other.update(extra)
    mean, _ = ref_elementwise_mean((SAMPLES + [extra])[-window:])
    assert _close_grid(other.mean(), mean, 1e-12)
    for bad in (WindowedAverage(window + 1, (2, 3)), WindowedAverage(window, (3, 2))):
        with pytest.raises(ValueError, match="window"):
            bad.load_state_dict(state)
    assert avg.to("cpu") is avg
    avg.reset()
    assert avg.seen == 0 and avg.pos == 0 and not avg.ok.any()


def test_average_argument_checks():
    for bad in (True, -1, (2, -1), (2, True), (2.0,)):
        with pytest.raises(ValueError, match="shape"):
            CesaroAverage(bad)
    for bad in ({"dtype": torch.int64}, {"dtype": torch.bool}):
        with pytest.raises(ValueError, match="dtype"):
            CesaroAverage(**bad)
        with pytest.raises(ValueError, match="dtype"):
            WindowedAverage(2, **bad)
    with pytest.raises(ValueError, match="window"):
        WindowedAverage(0)
    assert CesaroAverage(0).mean().shape == (0,)


# -------------------------------------------------------------------------------------- smoothness


def test_local_smoothness_and_directional_curvature_by_value():
    g_new = torch.tensor([1.0, -2.0, 0.5])
    g_old = torch.tensor([0.25, 1.0, 0.5])
    step = torch.tensor([0.3, 0.0, -0.4])
    want = math.sqrt(0.75 ** 2 + 3.0 ** 2) / math.sqrt(0.3 ** 2 + 0.4 ** 2)
    assert same(local_smoothness(g_new, g_old, step), want, 1e-6)
    assert math.isnan(local_smoothness(g_new, g_old, torch.zeros(3)))
    a = torch.tensor([[2.0, 0.5, 0.0], [0.5, -1.0, 0.3], [0.0, 0.3, 4.0]], dtype=torch.float64)
    d = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    quad = sum(d[i] * a[i, j] * d[j] for i in range(3) for j in range(3)) / sum(v * v for v in d)
    assert same(directional_curvature(lambda v: a @ v, d), quad, 1e-12)
    assert same(directional_curvature(lambda v: (a @ v).float(), d), quad, 1e-6)
    assert math.isnan(directional_curvature(lambda v: a @ v, torch.zeros(3, dtype=torch.float64)))


@pytest.mark.parametrize("l0, l1", [(2.0, 0.0), (2.0, 0.05), (2.0, 0.1), (2.0, 0.7), (0.3, 4.0)])
def test_clipping_advice_is_theorem_3_4_1(l0, l1):
    eta = 1 / (10 * l0)
    gamma = 1 / eta if l1 == 0 else min(1 / eta, 1 / (10 * l1 * eta))
    got = clipping_advice(l0, l1)
    assert same(got[0], eta, 1e-12) and same(got[1], gamma, 1e-12)


@pytest.mark.parametrize("l0, l1", [(0.0, 1.0), (-1.0, 1.0), (1.0, -0.1), (math.inf, 1.0), (1.0, math.inf),
                                    (NAN, 1.0), (1.0, NAN)])
def test_clipping_advice_out_of_range_is_nan(l0, l1):
    assert all(math.isnan(v) for v in clipping_advice(l0, l1))


def ref_l0l1(points, decay):
    """Weighted least squares of y on x, weight decay^(age) per finite point, with the fallbacks of the docstring."""
    pts = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    if not pts:
        return NAN, NAN
    ws = [decay ** (len(pts) - 1 - t) for t in range(len(pts))]
    w = sum(ws)
    mx = sum(wi * x for wi, (x, _) in zip(ws, pts)) / w
    my = sum(wi * y for wi, (_, y) in zip(ws, pts)) / w
    var = sum(wi * (x - mx) ** 2 for wi, (x, _) in zip(ws, pts)) / w
    cov = sum(wi * (x - mx) * (y - my) for wi, (x, y) in zip(ws, pts)) / w
    if len(pts) < 2 or var <= 1e-12 * max(mx * mx, 1e-300):
        return max(my, 0.0), 0.0
    l1 = cov / var
    l0 = my - l1 * mx
    if l1 < 0:
        return max(my, 0.0), 0.0
    if l0 < 0:
        sxx = sum(wi * x * x for wi, (x, _) in zip(ws, pts))
        sxy = sum(wi * x * y for wi, (x, y) in zip(ws, pts))
        return 0.0, max(sxy / sxx, 0.0)
    return l0, l1


FITS = {
    "positive line": [(0.5, 2.1), (1.0, 2.9), (2.0, 4.2), (NAN, 1.0), (3.5, 6.8), (1.5, 3.3)],
    "negative slope": [(0.5, 4.0), (1.0, 3.1), (2.0, 1.5), (3.0, 0.2)],
    "negative slope and mean": [(0.5, -1.0), (1.0, -2.0), (2.0, -3.5)],
    "through the origin": [(1.0, 0.5), (2.0, 2.4), (3.0, 4.7), (4.0, 6.1)],
    "no spread": [(2.0, 1.0), (2.0, 3.0), (2.0, 2.5)],
    "gentle slope": [(0.5, 2.0), (1.0, 2.3), (2.0, 2.6), (3.0, 3.1)],
    "origin, gentle slope, small x": [(0.1, 0.01), (0.2, 0.05), (0.3, 0.085), (0.4, 0.11)],
    "spread tiny against the mean": [(1000.0, 1.0), (1000.0 + 1e-4, 3.0), (1000.0 - 1e-4, 2.0)],
    "small x, spread resolved": [(1e-3, 1.0), (1e-3 + 2e-7, 3.0), (1e-3 - 1e-7, 0.5)],
    "one point": [(1.5, 2.5), (math.inf, 3.0)],
    "negative single": [(1.5, -2.5)],
    "none": [(NAN, 1.0)],
}


@pytest.mark.parametrize("decay", [1.0, 0.7])
@pytest.mark.parametrize("name", list(FITS))
def test_l0l1_fit_matches_weighted_least_squares(name, decay):
    fit = L0L1Fit(decay)
    for x, y in FITS[name]:
        fit.update(x, y)
    want = ref_l0l1(FITS[name], decay)
    got = fit.fit()
    assert same(got[0], want[0], 1e-9) and same(got[1], want[1], 1e-9), (got, want)
    advice = fit.advice()
    want_advice = clipping_advice(*want)
    assert all(same(a, b, 1e-9) for a, b in zip(advice, want_advice))
    other = L0L1Fit()
    other.load_state_dict(fit.state_dict())
    assert other.decay == decay and other.n == fit.n and other.fit() == got
    assert fit.n == sum(1 for x, y in FITS[name] if math.isfinite(x) and math.isfinite(y))


def test_l0l1_fit_decay_range_and_state_without_decay():
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="decay"):
            L0L1Fit(bad)
    fit = L0L1Fit(0.5)
    for x, y in FITS["positive line"]:
        fit.update(x, y)
    state = fit.state_dict()
    del state["decay"]
    other = L0L1Fit(0.9)
    other.load_state_dict(state)
    assert other.decay == 0.9 and other.fit() == fit.fit()
    assert L0L1Fit().fit()[0] != L0L1Fit().fit()[0]  # NaN before the first point


_DTYPES = {CesaroAverage: {"total": torch.float32, "count": torch.int64, "skipped": torch.int64},
           WindowedAverage: {"buf": torch.float32, "ok": torch.bool, "skipped": torch.int64}}


@pytest.mark.parametrize("make", [lambda: CesaroAverage(2, dtype=torch.float32),
                                  lambda: WindowedAverage(3, 2, dtype=torch.float32)], ids=["cesaro", "windowed"])
def test_accumulators_keep_their_dtypes_through_reset_and_a_foreign_state(make):
    """Counts are int64 and masks bool from the start; a state saved with other dtypes (a float64 accumulator's,
    int32 counts) is cast to this accumulator's on load."""
    avg = make()
    fields = _DTYPES[type(avg)]
    assert {k: getattr(avg, k).dtype for k in fields} == fields
    avg.update([1.0, math.nan])
    avg.update(torch.tensor([3.0, 2.0], dtype=torch.float64))
    foreign = {k: (v.double() if v.is_floating_point() else v.to(torch.int32)) if isinstance(v, torch.Tensor) else v
               for k, v in avg.state_dict().items()}
    other = make()
    other.load_state_dict(foreign)
    assert {k: getattr(other, k).dtype for k in fields} == fields
    assert torch.equal(other.mean(), torch.tensor([2.0, 2.0])) and torch.equal(other.skipped, torch.tensor([0, 1]))


_REFUSALS = [
    (lambda: CesaroAverage(-1), "invalid shape=(-1,); expected an int or a sequence of non-negative ints"),
    (lambda: CesaroAverage([2, -1]), "invalid shape=[2, -1]; expected an int or a sequence of non-negative ints"),
    (lambda: WindowedAverage(2, "a"), "invalid shape='a'; expected an int or a sequence of non-negative ints"),
    (lambda: CesaroAverage(True), "invalid shape=True; expected an int or a sequence of non-negative ints"),
    (lambda: WindowedAverage(2, 1.5), "invalid shape=1.5; expected an int or a sequence of non-negative ints"),
    (lambda: CesaroAverage(dtype=torch.int64), "invalid dtype=torch.int64; expected a floating-point torch dtype"),
    (lambda: WindowedAverage(0), "invalid window=0; expected an int with window >= 1"),
    (lambda: BatchMeansWindow(8, 1), "invalid n_batches=1; expected an int with n_batches >= 2"),
    (lambda: BatchMeansWindow(3, 4), "invalid window=3; expected an int with window >= 4"),
    (lambda: batch_means_ci([1.0] * 8, 1), "invalid n_batches=1; expected an int with n_batches >= 2"),
    (lambda: batch_means_ci([1.0] * 8, 2, 1.5),
     "invalid confidence=1.5; expected a finite number with confidence in (0, 1)"),
    (lambda: student_t_abs_cdf(1.0, 0), "invalid df=0; expected an int with df >= 1"),
    (lambda: L0L1Fit(decay=0.0), "invalid decay=0.0; expected a finite number with decay in (0, 1]"),
]


@pytest.mark.parametrize("call, message", _REFUSALS, ids=[m.split(";")[0] for _, m in _REFUSALS])
def test_statistics_refusals_name_the_argument_value_and_range(call, message):
    """The whole message: the argument, the value given and the accepted range (and the function called)."""
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value) == message
