"""Time averages over the empirical measure of the iterates (thesis ch. 6), in pure torch / python.

The thesis (ch. 6, "convergence beyond stationary points") observes that in large-scale training the loss
converges while the gradient norm does not, and explains it with the empirical measure of the iterates

    μ_k = (1/k) Σ_{t=1..k} δ_{θ_t}                                    (eq. (6.3))
    μ_k(φ) = E_{θ~μ_k}[φ(θ)] = (1/k) Σ_{t=1..k} φ(θ_t)                 (eq. (6.4))

i.e. the Cesàro (running) average of an observable φ along the trajectory. Thm 6.4.1 / 6.4.6 show that the
per-step gain E_{μ_n}[L(θ) − L(F(θ))] of the loss under the update map F is O(1/√n); Thm 6.5.1 shows that once
it has vanished while μ is not supported on stationary points, a smaller step size lowers the loss.

This module provides the accumulators behind :class:`lightning_opt.callbacks.time_average.TimeAverageMonitor`:

- :class:`CesaroAverage` — μ_k(φ) of eq. (6.4), element-wise over a fixed-shape tensor; updates stay on the
  tensor's device (no host synchronisation per step).
- :class:`WindowedAverage` — the sliding-window average M_t = (1/n) Σ_{i=t−n+1..t} φ(θ_i) of Lemma 6.4.2.
- :func:`batch_means_ci` / :class:`BatchMeansWindow` — batch-means confidence intervals for the mean of a
  stationary but autocorrelated scalar sequence (e.g. the per-step gain along a cycling trajectory).
- :func:`t_critical` — two-sided Student-t critical values (exact finite series, no scipy).

Non-finite policy: a non-finite sample (NaN/±inf) is *skipped* — it does not enter the sum, the count or the
window — and is counted in ``skipped``, so one overflowing step cannot poison an average forever.

Never imports Lightning.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from functools import lru_cache
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor

from lightning_opt._validation import check_float, check_int, invalid

__all__ = [
    "BatchMeansWindow",
    "CesaroAverage",
    "WindowedAverage",
    "batch_means_ci",
    "student_t_abs_cdf",
    "t_critical",
]

_Shape = int | Sequence[int]


def _as_shape(shape: _Shape) -> tuple[int, ...]:
    if isinstance(shape, bool):
        raise invalid("shape", shape, "an int or a sequence of non-negative ints")
    if isinstance(shape, int):
        shape = (shape,)
    try:
        out = tuple(shape)
    except TypeError:  # not iterable (a float, None): the same ValueError as any other bad shape
        raise invalid("shape", shape, "an int or a sequence of non-negative ints") from None
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in out):
        raise invalid("shape", shape, "an int or a sequence of non-negative ints")
    return out


def _check_float_dtype(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise invalid("dtype", dtype, "a floating-point torch dtype")


# ----------------------------------------------------------------------------------------------------------
# Student t
# ----------------------------------------------------------------------------------------------------------


def student_t_abs_cdf(t: float, df: int) -> float:
    """P(|T| ≤ t) for a Student-t variable with integer ``df`` ≥ 1 degrees of freedom.

    Exact finite series (Abramowitz & Stegun 26.7.3–26.7.4) in θ = atan(t/√df):

    - odd df: (2/π)[θ + sinθ(cosθ + (2/3)cos³θ + … + (2·4⋯(df−3))/(1·3⋯(df−2)) cos^{df−2}θ)], 2θ/π if df = 1;
    - even df: sinθ [1 + (1/2)cos²θ + … + (1·3⋯(df−3))/(2·4⋯(df−2)) cos^{df−2}θ].
    """
    check_int("df", df, 1)
    if t <= 0:
        return 0.0
    if math.isinf(t):
        return 1.0
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    c2 = c * c
    if df % 2 == 1:
        series, term = 0.0, c
        for k in range(1, (df - 1) // 2 + 1):
            series += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return min(1.0, (2.0 / math.pi) * (theta + s * series))
    series, term = 0.0, 1.0
    for k in range(1, df // 2 + 1):
        series += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return min(1.0, s * series)


@lru_cache(maxsize=512)
def t_critical(confidence: float, df: int) -> float:
    """Two-sided Student-t critical value: the t with P(|T_df| ≤ t) = ``confidence``.

    ``df`` ≥ 1 integer; above 10⁵ degrees of freedom the normal quantile is returned. Solved by bisection on
    :func:`student_t_abs_cdf` to ~1e-12 relative accuracy and cached.
    """
    check_float("confidence", confidence, 0.0, 1.0, low_open=True, high_open=True)
    check_int("df", df, 1)
    confidence = float(confidence)
    if df > 100_000:
        return NormalDist().inv_cdf(0.5 + confidence / 2.0)
    lo, hi = 0.0, 1.0
    while student_t_abs_cdf(hi, df) < confidence:
        lo, hi = hi, hi * 2.0
        if hi > 1e300:  # confidence indistinguishable from 1 in double precision
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_abs_cdf(mid, df) < confidence:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------------------------------------
# Batch means
# ----------------------------------------------------------------------------------------------------------


def _to_floats(samples: Sequence[float] | Tensor | Iterable[float]) -> list[float]:
    if isinstance(samples, Tensor):
        return [float(v) for v in samples.detach().reshape(-1).double().cpu().tolist()]
    return [float(v) for v in samples]


def batch_means_ci(
    samples: Sequence[float] | Tensor, n_batches: int, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Batch-means confidence interval for the mean of a stationary, possibly autocorrelated, sequence.

    The last ``m·b`` samples (``b = n_batches``, ``m = len(samples) // b``; the oldest remainder is dropped)
    are cut into ``b`` consecutive batches of ``m`` samples. With batch means Y_1..Y_b, grand mean Ȳ and
    their sample standard deviation s, the interval is ``Ȳ ± t_{b−1, confidence} · s / √b``. Batching makes
    the batch means nearly independent when ``m`` exceeds the correlation time, which is what makes the
    interval valid for a correlated sequence (an i.i.d. interval would be far too narrow).

    For a deterministic map the summed gain telescopes, Σ_t [L(θ_t) − L(θ_{t+1})] = L(θ_1) − L(θ_{n+1}), so
    the batch means are ±(loss spread)/m and the interval contains 0 on a cycle — the invariant-measure
    picture of Thm 6.4.1.

    Returns ``(mean, lo, hi)``: ``mean`` over the samples used; ``lo``/``hi`` are NaN when fewer than
    ``n_batches`` samples are available. Non-finite samples are dropped first.
    """
    check_int("n_batches", n_batches, 2)
    check_float("confidence", confidence, 0.0, 1.0, low_open=True, high_open=True)
    xs = [v for v in _to_floats(samples) if math.isfinite(v)]
    if not xs:
        return math.nan, math.nan, math.nan
    m = len(xs) // n_batches
    if m == 0:
        return math.fsum(xs) / len(xs), math.nan, math.nan
    used = xs[len(xs) - m * n_batches:]
    means = [math.fsum(used[j * m:(j + 1) * m]) / m for j in range(n_batches)]
    grand = math.fsum(means) / n_batches
    var = math.fsum((y - grand) ** 2 for y in means) / (n_batches - 1)
    half = t_critical(float(confidence), n_batches - 1) * math.sqrt(var / n_batches)
    return grand, grand - half, grand + half


class BatchMeansWindow:
    """The last ``window`` finite scalar samples, with a batch-means confidence interval for their mean.

    Host-side (python floats): meant for statistics that are computed every few steps and need a decision on
    the host anyway (the per-step gain of Thm 6.4.1 in :class:`TimeAverageMonitor`).
    """

    def __init__(self, window: int, n_batches: int) -> None:
        check_int("n_batches", n_batches, 2)
        check_int("window", window, n_batches)
        self.window = window
        self.n_batches = n_batches
        self._buf: deque[float] = deque(maxlen=window)
        self.skipped = 0

    def update(self, x: float | Tensor) -> None:
        v = float(x)
        if math.isfinite(v):
            self._buf.append(v)
        else:
            self.skipped += 1

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def full(self) -> bool:
        return len(self._buf) == self.window

    def values(self) -> list[float]:
        return list(self._buf)

    def mean(self) -> float:
        return math.fsum(self._buf) / len(self._buf) if self._buf else math.nan

    def ci(self, confidence: float = 0.95) -> tuple[float, float, float]:
        """``(mean, lo, hi)`` by :func:`batch_means_ci` over the window."""
        return batch_means_ci(list(self._buf), self.n_batches, confidence)

    def reset(self) -> None:
        self._buf.clear()
        self.skipped = 0

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "n_batches": self.n_batches, "values": list(self._buf),
                "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["window"]) != self.window or int(state["n_batches"]) != self.n_batches:
            raise ValueError(
                f"BatchMeansWindow state has window={state['window']}, n_batches={state['n_batches']}; "
                f"this instance has window={self.window}, n_batches={self.n_batches}")
        self._buf = deque((float(v) for v in state["values"]), maxlen=self.window)
        self.skipped = int(state["skipped"])


# ----------------------------------------------------------------------------------------------------------
# Cesàro and windowed averages (device-side)
# ----------------------------------------------------------------------------------------------------------


class _DeviceAccumulator:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def _prepare(self, x: Tensor | float | Sequence[float]) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor):
            x = torch.as_tensor(x, dtype=self.dtype, device=self.device)
        elif x.dtype != self.dtype or x.device != self.device:
            x = x.detach().to(device=self.device, dtype=self.dtype)
        if x.shape != self.shape:
            raise ValueError(f"sample shape {tuple(x.shape)} does not match the accumulator's {self.shape}")
        ok = torch.isfinite(x)
        return x.detach().nan_to_num(0.0, 0.0, 0.0), ok

    @staticmethod
    def _safe_div(total: Tensor, count: Tensor) -> Tensor:
        nan = torch.full((), math.nan, dtype=total.dtype, device=total.device)
        return torch.where(count > 0, total / count.clamp_min(1).to(total.dtype), nan)


class CesaroAverage(_DeviceAccumulator):
    """Running (Cesàro) average μ_k(φ) = (1/k) Σ_{t≤k} φ(θ_t) of thesis eq. (6.3)–(6.4), element-wise.

    ``update`` takes a tensor of the accumulator's ``shape`` (a scalar by default) and never synchronises
    with the host; sums are kept in ``dtype`` (float64 by default). Non-finite entries are skipped (not
    counted) and tallied in ``skipped``; ``mean()`` is NaN where nothing finite has been seen.
    """

    def __init__(self, shape: _Shape = (), *, dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None) -> None:
        _check_float_dtype(dtype)
        self.shape = _as_shape(shape)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        """Forget every sample (start a new Cesàro average, e.g. at a step-size change)."""
        self.total = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        self.count = torch.zeros(self.shape, dtype=torch.int64, device=self.device)
        self.skipped = torch.zeros(self.shape, dtype=torch.int64, device=self.device)

    def update(self, x: Tensor | float | Sequence[float]) -> None:
        v, ok = self._prepare(x)
        self.total += v
        self.count += ok
        self.skipped += ~ok

    def mean(self) -> Tensor:
        """μ_k(φ) as a tensor of ``shape`` (NaN where no finite sample yet)."""
        return self._safe_div(self.total, self.count)

    def to(self, device: torch.device | str) -> CesaroAverage:
        self.device = torch.device(device)
        self.total, self.count, self.skipped = (t.to(self.device)
                                                for t in (self.total, self.count, self.skipped))
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "total": self.total.detach().cpu().clone(),
                "count": self.count.detach().cpu().clone(), "skipped": self.skipped.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["shape"]) != self.shape:
            raise ValueError(f"CesaroAverage state has shape {tuple(state['shape'])}, this one {self.shape}")
        self.total = state["total"].to(device=self.device, dtype=self.dtype).clone()
        self.count = state["count"].to(device=self.device, dtype=torch.int64).clone()
        self.skipped = state["skipped"].to(device=self.device, dtype=torch.int64).clone()


class WindowedAverage(_DeviceAccumulator):
    """Sliding-window average M_t = (1/n) Σ_{i=t−n+1..t} φ(θ_i) with window n (thesis Lemma 6.4.2),
    element-wise.

    A ring buffer of the last ``window`` updates on the accumulator's device; ``update`` writes one slot and
    never synchronises. Non-finite entries occupy their slot but are excluded from the mean (and tallied in
    ``skipped``), so the mean is over the finite values among the last ``window`` updates.
    """

    def __init__(self, window: int, shape: _Shape = (), *, dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None) -> None:
        check_int("window", window, 1)
        _check_float_dtype(dtype)
        self.window = window
        self.shape = _as_shape(shape)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        self.buf = torch.zeros((self.window, *self.shape), dtype=self.dtype, device=self.device)
        self.ok = torch.zeros((self.window, *self.shape), dtype=torch.bool, device=self.device)
        self.skipped = torch.zeros(self.shape, dtype=torch.int64, device=self.device)
        self.pos = 0
        self.seen = 0

    def update(self, x: Tensor | float | Sequence[float]) -> None:
        v, ok = self._prepare(x)
        self.buf[self.pos].copy_(v)
        self.ok[self.pos].copy_(ok)
        self.skipped += ~ok
        self.pos = (self.pos + 1) % self.window
        self.seen += 1

    def mean(self) -> Tensor:
        """Mean of the finite values among the last ``window`` updates (NaN where there are none)."""
        return self._safe_div(self.buf.sum(0), self.ok.sum(0))

    def to(self, device: torch.device | str) -> WindowedAverage:
        self.device = torch.device(device)
        self.buf, self.ok, self.skipped = (t.to(self.device) for t in (self.buf, self.ok, self.skipped))
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "shape": list(self.shape), "buf": self.buf.detach().cpu().clone(),
                "ok": self.ok.detach().cpu().clone(), "skipped": self.skipped.detach().cpu().clone(),
                "pos": self.pos, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["window"]) != self.window or tuple(state["shape"]) != self.shape:
            raise ValueError(
                f"WindowedAverage state has window={state['window']}, shape={tuple(state['shape'])}; "
                f"this one window={self.window}, shape={self.shape}")
        self.buf = state["buf"].to(device=self.device, dtype=self.dtype).clone()
        self.ok = state["ok"].to(device=self.device, dtype=torch.bool).clone()
        self.skipped = state["skipped"].to(device=self.device, dtype=torch.int64).clone()
        self.pos = int(state["pos"])
        self.seen = int(state["seen"])
