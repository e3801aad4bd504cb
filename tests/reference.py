"""Float64 references for the strategy tests, written from the papers' equations with no ``lightning_opt`` or
``torch.optim`` code in them: TinyModel(bn=False)'s network, the inner optimizers, and Lookahead / Local SGD with
N workers.

Data order is that of the test scripts: ``make_data(96)`` sharded by an unshuffled ``DistributedSampler`` (rank r
gets rows r, r + N, r + 2N, …) and cut into batches in order, epoch after epoch.
"""

from __future__ import annotations

import math

import torch
from scripts._common import TinyModel, make_data

LR, MU = 0.05, 0.9


class Worker:
    """One rank's TinyModel(bn=False) in float64: Linear(6, 16) → tanh → Linear(16, 1), mean squared error;
    gradients from autograd."""

    def __init__(self, rank: int = 0, world: int = 1, batch: int = 8) -> None:
        self.x = [p.detach().double().clone() for p in TinyModel(bn=False).parameters()]
        data = make_data(96)
        self.inputs, self.target = (v[rank::world].double() for v in data.tensors)
        self.batch, self.batches = batch, (96 // world) // batch

    def grad(self, t: int) -> list[torch.Tensor]:
        """Gradient at the current weights on the batch of (0-based) step t."""
        rows = slice(self.batch * (t % self.batches), self.batch * (t % self.batches + 1))
        w1, b1, w2, b2 = (p.clone().requires_grad_(True) for p in self.x)
        out = torch.tanh(self.inputs[rows] @ w1.T + b1) @ w2.T + b2
        loss = ((out - self.target[rows]) ** 2).mean()
        return list(torch.autograd.grad(loss, (w1, b1, w2, b2)))

    def flat(self) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self.x])


class HeavyBall:
    """torch's SGD with momentum: b ← μ b + g (b = g at the first step), x ← x − η b; ``buf`` is b."""

    def __init__(self, w: Worker, lr: float = LR, mu: float = MU) -> None:
        self.w, self.lr, self.mu, self.buf = w, lr, mu, None

    def step(self, t: int) -> None:
        g = self.w.grad(t)
        self.buf = g if self.buf is None else [self.mu * b + gi for b, gi in zip(self.buf, g)]
        self.w.x = [x - self.lr * b for x, b in zip(self.w.x, self.buf)]


class AdamRef:
    """Adam (Kingma & Ba, Alg. 1) with torch's defaults β = (0.9, 0.999), ε = 1e-8; ``buf`` is the first moment."""

    def __init__(self, w: Worker, lr: float = 0.01) -> None:
        self.w, self.lr, self.t = w, lr, 0
        self.buf = [torch.zeros_like(x) for x in w.x]
        self.v = [torch.zeros_like(x) for x in w.x]

    def step(self, t: int) -> None:
        g, self.t = self.w.grad(t), self.t + 1
        self.buf = [0.9 * m + 0.1 * gi for m, gi in zip(self.buf, g)]
        self.v = [0.999 * v + 0.001 * gi * gi for v, gi in zip(self.v, g)]
        c1, c2 = 1 - 0.9 ** self.t, 1 - 0.999 ** self.t
        self.w.x = [x - self.lr * (m / c1) / ((v / c2).sqrt() + 1e-8) for x, m, v in zip(self.w.x, self.buf, self.v)]


def mean(tensor_lists: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [sum(ts) / len(ts) for ts in zip(*tensor_lists)]


def lookahead(alpha: float, k: int, steps: int, pullback: str = "none", world: int = 1, batch: int = 8,
              adam: bool = False, mu: float = MU) -> list[torch.Tensor]:
    """Lookahead (Zhang et al. 2019, Alg. 1; with N workers the multi-agent form, x̄ their mean): k inner steps,
    then z ← z + α(x̄ − z), x ← z, z₀ = x₀. Momentum at a sync: "reset" zeroes it; "pullback"
    m ← α m + (1 − α) m_z, m_z ← m (m_z = 0 before the first sync). Returns each worker's flat weights after
    every step."""
    workers = [Worker(r, world, batch) for r in range(world)]
    inners = [AdamRef(w) if adam else HeavyBall(w, mu=mu) for w in workers]
    slow = list(workers[0].x)
    slow_m = [[torch.zeros_like(x) for x in w.x] for w in workers]
    out: list[list[torch.Tensor]] = [[] for _ in workers]
    for t in range(steps):
        for inner in inners:
            inner.step(t)
        if (t + 1) % k == 0:
            slow = [z + alpha * (xb - z) for z, xb in zip(slow, mean([w.x for w in workers]))]
            for r, (w, inner) in enumerate(zip(workers, inners)):
                w.x = list(slow)
                if pullback == "reset":
                    inner.buf = [torch.zeros_like(m) for m in inner.buf]
                elif pullback == "pullback":
                    inner.buf = [alpha * m + (1 - alpha) * mz for m, mz in zip(inner.buf, slow_m[r])]
                    slow_m[r] = list(inner.buf)
        for r, w in enumerate(workers):
            out[r].append(w.flat())
    return [torch.stack(o) for o in out]


def local_sgd_outer(lr: float, mu: float, nesterov: bool, k: int, steps: int, world: int = 1,
                    inner_mu: float = MU) -> list[torch.Tensor]:
    """Local SGD with an outer optimizer (SlowMo, Wang et al. 2020, Alg. 1; DiLoCo, Douillard et al. 2023,
    Alg. 1): Δ = a − x̄; m ← μ m + Δ; d = Δ + μ m (Nesterov) or m; a ← a − η_out d; every x ← a. The inner
    optimizers' state is left alone. Returns each worker's flat weights after every step."""
    workers = [Worker(r, world) for r in range(world)]
    inners = [HeavyBall(w, mu=inner_mu) for w in workers]
    anchor = list(workers[0].x)
    m = [torch.zeros_like(x) for x in anchor]
    out: list[list[torch.Tensor]] = [[] for _ in workers]
    for t in range(steps):
        for inner in inners:
            inner.step(t)
        if (t + 1) % k == 0:
            delta = [a - xb for a, xb in zip(anchor, mean([w.x for w in workers]))]
            m = [mu * mi + d for mi, d in zip(m, delta)]
            direction = [d + mu * mi for d, mi in zip(delta, m)] if nesterov else m
            anchor = [a - lr * d for a, d in zip(anchor, direction)]
            for w in workers:
                w.x = list(anchor)
        for r, w in enumerate(workers):
            out[r].append(w.flat())
    return [torch.stack(o) for o in out]


def same(a, b, rel: float = 1e-9) -> bool:
    """Equal up to rounding (relative ``rel``, absolute 1e-12), a NaN equal to a NaN: for by-value checks of
    statistics whose undefined cases return NaN."""
    a, b = float(a), float(b)
    if math.isnan(b):
        return math.isnan(a)
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def streaming_diloco(k: int, steps: int, parts: list[tuple[int, int]], offsets: list[int], overlap: int, mix: float,
                     outer: str = "sgd", lr: float = 1.0, mu: float = 0.0, nesterov: bool = False,
                     world: int = 2, anchors: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Streaming DiLoCo (Douillard et al. 2025, Alg. 1–2) over TinyModel(bn=False)'s weights flattened (129 values):
    fragment p (the values ``parts[p] = (start, stop)``) sends Δ_p = mean over workers of (a_p − x_p) after local
    steps t with (t − 1) mod k + 1 = ``offsets[p]``; ``overlap`` steps later (right away if 0) the outer step moves
    a_p (SGD: m ← μ m + Δ, d = Δ + μ m (Nesterov) or m, a ← a − lr d; "adam": Adam at lr with β = (0.9, 0.999),
    ε = 1e-8, one step count per fragment) and every worker merges x_p ← (1 − mix) x_p + mix a_p. Returns each
    worker's flat weights after every step; ``anchors``, if given, receives the anchors at the end, after the outer
    steps of the fragments still in flight (applied with no merge: training is over)."""
    workers = [Worker(r, world) for r in range(world)]
    inners = [HeavyBall(w) for w in workers]
    shapes = [x.shape for x in workers[0].x]
    anchor = workers[0].flat().clone()
    m1, v = torch.zeros_like(anchor), torch.zeros_like(anchor)
    count = [0] * len(parts)
    flying: dict[int, tuple[int, torch.Tensor]] = {}

    def set_flat(w: Worker, flat: torch.Tensor) -> None:
        sizes = [math.prod(s) for s in shapes]
        w.x = [c.reshape(s).clone() for c, s in zip(flat.split(sizes), shapes)]

    def apply(p: int, merge: bool = True) -> None:
        _, g = flying.pop(p)
        a, b = parts[p]
        count[p] += 1
        if outer == "adam":
            m1[a:b] = 0.9 * m1[a:b] + 0.1 * g
            v[a:b] = 0.999 * v[a:b] + 0.001 * g * g
            c1, c2 = 1 - 0.9 ** count[p], 1 - 0.999 ** count[p]
            anchor[a:b] = anchor[a:b] - lr * (m1[a:b] / c1) / ((v[a:b] / c2).sqrt() + 1e-8)
        else:
            m1[a:b] = mu * m1[a:b] + g
            anchor[a:b] = anchor[a:b] - lr * (g + mu * m1[a:b] if nesterov else m1[a:b])
        for w in workers if merge else ():
            flat = w.flat()
            flat[a:b] = (1 - mix) * flat[a:b] + mix * anchor[a:b]
            set_flat(w, flat)

    out: list[list[torch.Tensor]] = [[] for _ in workers]
    for t in range(1, steps + 1):
        for inner in inners:
            inner.step(t - 1)
        for p in sorted(p for p, (at, _) in flying.items() if at == t):
            apply(p)
        for p, o in enumerate(offsets):
            if (t - 1) % k + 1 == o:
                a, b = parts[p]
                flying[p] = (t + overlap, sum(anchor[a:b] - w.flat()[a:b] for w in workers) / world)
                if overlap == 0:
                    apply(p)
        for r, w in enumerate(workers):
            out[r].append(w.flat())
    if anchors is not None:
        for p in sorted(flying):
            apply(p, merge=False)
        anchors.append(anchor)
    return [torch.stack(o) for o in out]
