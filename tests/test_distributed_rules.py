"""The distributed helpers' rules in one process (no process group): the finiteness check, how tensors are cut
into buckets, and what the non-finite agreement decides for a lone rank. The collectives themselves are checked
across processes in ``test_overlap.py``; these run in process so that ``make mutate`` can reach them."""

from __future__ import annotations

import math
import re

import pytest
import torch

from lightning_opt.distributed import NonFiniteError, all_finite
from lightning_opt.distributed.buckets import bucket_indices, ddp_bucket_indices, write_back
from lightning_opt.distributed.consensus import Agreement, agree
from lightning_opt.distributed.overlap import OverlappedGradSum


def test_all_finite_fast_path_and_overflow():
    assert all_finite([]) and all_finite([torch.ones(3), torch.zeros(2, dtype=torch.float16)])
    for bad in (math.nan, math.inf, -math.inf):
        assert not all_finite([torch.ones(3), torch.tensor([0.0, bad])])
    assert not all_finite([torch.tensor([math.inf, -math.inf])])  # sums to NaN
    big = torch.full((4,), 3e38)  # finite elements whose float32 sum overflows: checked element by element
    assert all_finite([big])
    assert all_finite([torch.full((8,), 60000.0, dtype=torch.float16)])  # its norm overflows in half precision
    assert all_finite([torch.tensor([1, 2]), torch.tensor([True])])  # integers and booleans
    assert not all_finite([torch.tensor([1, 2]), torch.tensor([1 + 1j, complex(math.nan, 0.0)])])


def test_buckets_close_when_the_next_tensor_would_pass_the_cap():
    f32 = [torch.zeros(n) for n in (2, 2, 1, 4, 3, 1)]  # 8, 8, 4, 16, 12, 4 bytes
    # cap 16: 8 + 8 fits exactly; 4 opens a bucket, 4 + 16 does not fit; a tensor alone at the cap fills one
    assert bucket_indices(f32, 16) == [[0, 1], [2], [3], [4, 5]]
    assert bucket_indices(f32, 15) == [[0], [1, 2], [3], [4], [5]]
    # a new bucket counts only its own tensors: after [3] closes, 12 + 4 fits in 16 again
    assert bucket_indices([torch.zeros(4), torch.zeros(3), torch.zeros(1)], 16) == [[0], [1, 2]]
    # one bucket per dtype, order kept within each
    mixed = [torch.zeros(2), torch.zeros(2, dtype=torch.float64), torch.zeros(2), torch.zeros(1, dtype=torch.float64)]
    assert bucket_indices(mixed, 1 << 20) == [[0, 2], [1, 3]]


def test_gradient_buckets_close_at_their_limit_as_ddp_cuts_them():
    f32 = [torch.zeros(n) for n in (4, 2, 3, 1, 5)]  # 16, 8, 12, 4, 20 bytes
    # first bucket limit 20: 16 + 8 reaches it (the crossing tensor joins); later ones 16: 12 + 4 is exactly 16
    assert ddp_bucket_indices(f32, 20, 16) == [[0, 1], [2, 3], [4]]
    assert ddp_bucket_indices(f32, 10, 10) == [[0], [1, 2], [3, 4]]
    assert ddp_bucket_indices([], 1, 1) == []
    # byte-exact edges: 3 + 1 reaches a first limit of 4, and a new bucket starts from nothing (3 + 1 again)
    u8 = [torch.zeros(n, dtype=torch.uint8) for n in (3, 1, 3, 1, 2)]
    assert ddp_bucket_indices(u8, 4, 4) == [[0, 1], [2, 3], [4]]
    assert ddp_bucket_indices(u8, 5, 3) == [[0, 1, 2], [3, 4]]  # 3 + 1 + 3 reach 5; 1 + 2 reach 3
    # per dtype, each with its own first limit; buckets ordered by their first tensor
    mixed = [torch.zeros(1), torch.zeros(1, dtype=torch.float64), torch.zeros(1), torch.zeros(1, dtype=torch.float64)]
    assert ddp_bucket_indices(mixed, 8, 100) == [[0, 2], [1], [3]]
    assert ddp_bucket_indices(mixed[:3] + [torch.zeros(1)], 4, 100) == [[0], [1], [2, 3]]


def test_overlapped_buckets_run_backwards_with_a_full_first_bucket():
    # reverse parameter order; the 1.2 MB tensor that crosses the 1 MB first limit travels in the first bucket
    params = [torch.zeros(n, requires_grad=True) for n in (100_000, 100_000, 100_000, 300_000, 10)]
    summer = OverlappedGradSum(params, cap_mb=0.5)  # 0.4 MB + 0.4 MB reaches 0.5 MB
    assert summer.buckets == [[4, 3], [2, 1], [0]]
    assert OverlappedGradSum(params, cap_mb=2.0).buckets == [[4, 3], [2, 1, 0]]
    small = [torch.zeros(10, requires_grad=True) for _ in range(3)]
    assert OverlappedGradSum(small, cap_mb=1.0).buckets == [[2, 1, 0]]
    summer.remove()


def _sums() -> tuple[list, list]:
    """Two summed buckets and each tensor's view into them (as OverlappedGradSum keeps them)."""
    first, second = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0])
    return [([0], first), ([1, 2], second)], [first.view(1, 2), second[:1], second[1:]]


def test_write_back_through_kept_views_scales_every_bucket_once():
    expected = [0.3, 0.6, 0.9, 1.2, 1.5]
    for kept in (True, False):
        buckets, views = _sums()
        out = [torch.zeros(1, 2), torch.zeros(1, dtype=torch.float64), torch.zeros(2)]
        write_back(buckets, out, 0.3, views=views if kept else None)
        assert torch.cat([t.reshape(-1).float() for t in out]).tolist() == pytest.approx(expected, abs=1e-7)
        assert out[0].shape == (1, 2) and out[1].dtype == torch.float64
    buckets, views = _sums()
    out = [torch.zeros(1, 2), torch.zeros(1), torch.zeros(2)]
    write_back(buckets, out, 1.0, views=views)
    assert [t.tolist() for t in out] == [[[1.0, 2.0]], [3.0], [4.0, 5.0]]
    buckets, views = _sums()
    write_back(buckets, out, 2.0, views=views)
    assert [t.tolist() for t in out] == [[[2.0, 4.0]], [6.0], [8.0, 10.0]]
    write_back([], [], 0.5, views=[])  # nothing to write


def test_agreement_writes_the_healthy_mean_through_its_views():
    buckets, views = _sums()
    agreement = Agreement(3, [1], False, buckets, torch.zeros(0), views)
    out = [torch.zeros(1, 2), torch.zeros(1), torch.zeros(2)]
    agreement.write(out)  # two healthy ranks: half the sums
    assert [t.tolist() for t in out] == [[[0.5, 1.0]], [1.5], [2.0, 2.5]]
    buckets, views = _sums()
    Agreement(3, [], False, buckets, torch.zeros(0), views).write(out, mean=False)
    assert [t.tolist() for t in out] == [[[1.0, 2.0]], [3.0], [4.0, 5.0]]


def test_a_lone_rank_decides_by_its_own_tensors():
    ok = agree([torch.ones(2)], policy="raise", what="gradients", step=7, total=False)
    assert ok.bad == [] and not ok.local_bad and ok.world == 1
    nan = [torch.ones(2), torch.tensor([math.nan])]
    with pytest.raises(NonFiniteError, match="^" + re.escape(
            "non-finite gradients on rank(s) [0] at optimizer step 7; refusing to use them on any rank (nothing was "
            "written). Pass nonfinite='drop' to leave such ranks out and reset them.") + "$"):
        agree(nan, policy="raise", what="gradients", step=7, total=False)
    with pytest.raises(ValueError, match="^" + re.escape("invalid policy='skip'; expected one of 'raise', 'drop'")):
        agree(nan, policy="skip", what="weights", step=9, total=False)
    with pytest.raises(NonFiniteError, match="^" + re.escape(
            "non-finite weights on every rank at optimizer step 9; nothing to reset them to") + "$"):
        agree(nan, policy="drop", what="weights", step=9, total=False)
    judged = agree(nan, policy="drop", what="weights", step=9, total=False, corrupt=lambda ts: False)
    assert judged.bad == [] and not judged.local_bad  # the caller's judgement replaces the finiteness check
