"""Two identities the per-group references (test_optim_reference.py) do not cover: GClip equals torch's
clip_grad_norm_ + SGD, and NGD with β = 0 leaves the weights alone on a zero gradient."""

from __future__ import annotations

import torch

from lightning_opt.optim.clipped_sgd import ClippedSGD
from lightning_opt.optim.normalized_sgd import NormalizedSGD

SHAPES = [(3, 4), (5,), ()]
STEPS = 6


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]


def grad_sequence(seed: int = 1, scale: float = 3.0) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        [scale * torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(STEPS)
    ]


def test_gclip_equals_sgd_plus_clip_grad_norm():
    """GClip with momentum / Nesterov / weight decay == clip_grad_norm_ + torch.optim.SGD (up to its 1e-6)."""
    a, b = make_params(), make_params()
    opt_a = ClippedSGD(a, lr=0.1, max_norm=1.0, momentum=0.9, nesterov=True, weight_decay=0.01)
    opt_b = torch.optim.SGD(b, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    for gs in grad_sequence():
        for pa, pb, g in zip(a, b, gs):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        torch.nn.utils.clip_grad_norm_(b, 1.0)
        opt_b.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)




def test_normalized_sgd_zero_gradient_beta_zero_is_a_no_op():
    p = torch.nn.Parameter(torch.ones(3))
    opt = NormalizedSGD([p], lr=1.0, beta=0.0)
    p.grad = torch.zeros(3)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3))
