"""Raw gloo process group (no Lightning): OverlappedGradSum against a plain all-reduce of the gradients.

Each rank prints one ``RESULT {json}`` line."""

from __future__ import annotations

import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from lightning_opt.distributed.buckets import all_reduce_flat
from lightning_opt.distributed.overlap import OverlappedGradSum


def reference(params):
    out = []
    for p in params:
        g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        out.append(g)
    return out


def compare(buckets, params, ref) -> float:
    err = 0.0
    for idx, flat in buckets:
        offset = 0
        for i in idx:
            n = params[i].numel()
            err = max(err, float((flat[offset:offset + n] - ref[i].reshape(-1)).abs().max()))
            offset += n
    return err


def count_all_reduces() -> list[int]:
    """Count the calls to ``dist.all_reduce`` from now on (the modules look it up on ``dist`` at call time)."""
    calls = [0]
    original = dist.all_reduce

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counted
    return calls


def second_step_trailer(summer, params, loss) -> list[float]:
    """A second armed step reuses the grown last bucket: its trailer is summed afresh, not accumulated."""
    for p in params:
        p.grad = None
    summer.arm()
    loss(True).backward()
    trailer = torch.tensor([2.0, 0.0, 1.0])
    summer.finish(trailer=trailer)
    return trailer.tolist()


def judged(summer, params, model, loss, rank) -> dict:
    """``local_finite`` on this rank's own gradients, never on the sums: a NaN on rank 1 in the first bucket (the
    last layer, sent during backward) leaves rank 0 finite although the sums it receives are NaN; gradients whose
    norm overflows are finite; a NaN written by a second backward after its bucket left is still seen; ``views``
    are the sums."""
    out = {}
    last = model[6].weight  # in the first bucket: sent during backward

    def step(extra=None, twice=False) -> bool:
        for p in params:
            p.grad = None
        summer.arm()
        (loss(True) + (extra() if extra is not None else 0.0)).backward()
        if twice:
            (last.sum() * float("nan")).backward()
        finite = summer.local_finite()
        out.setdefault("sent_in_backward", summer._launched)
        summer.finish()
        return finite

    out["finite_clean"] = step()
    out["views_err"] = max(float((v - r).abs().max()) for v, r in zip(summer.views(), reference(params)))
    out["finite_nan_on_rank_1"] = step(lambda: last.sum() * (float("nan") if rank == 1 else 0.0))
    out["late_in_nan_step"] = summer.late  # judged by the norms, not the element-wise fallback
    where = [id(p) for p in params].index(id(last))
    out["first_bucket_sum_nan"] = not bool(torch.isfinite(summer.views()[where]).all())
    out["finite_overflowing_norm"] = step(lambda: last.sum() * 1e25)
    out["finite_late_nan"] = step(twice=True)
    out["late"] = summer.late
    return out


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    torch.manual_seed(0)
    # 4 x 1 MB layers: several buckets at cap 1 MB, so some leave while backward still runs
    model = nn.Sequential(nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 512),
                          nn.Tanh(), nn.Linear(512, 512))
    extra = nn.Parameter(torch.ones(3))
    params = [*model.parameters(), extra]
    summer = OverlappedGradSum(params, cap_mb=1.0)
    torch.manual_seed(1 + rank)
    x = torch.randn(8, 512)
    result = {"buckets": len(summer.buckets), "rank": rank}

    def loss(use_extra: bool):
        out = model(x).square().mean()
        return out + extra.sum() * (rank + 1) if use_extra else out

    # a) every parameter used on both ranks
    summer.arm()
    loss(True).backward()
    result["launched_in_backward"] = summer._launched
    result["err_all_used"] = compare(summer.finish(), params, reference(params))
    result["late_all_used"] = summer.late

    # b) `extra` unused on rank 0: no gradient there, so zeros are summed for it
    for p in params:
        p.grad = None
    summer.arm()
    loss(rank == 1).backward()
    result["err_unused"] = compare(summer.finish(), params, reference(params))

    # c) two backward passes in one armed step: the second changes gradients whose buckets already left
    for p in params:
        p.grad = None
    summer.arm()
    loss(True).backward()
    loss(True).backward()
    summer.finish()
    result["late_double_backward"] = summer.late

    # e) a trailer rides in the last bucket: no collective beyond the buckets, sums unchanged
    calls = count_all_reduces()
    for p in params:
        p.grad = None
    summer.arm()
    loss(True).backward()
    trailer = torch.tensor([1.0 + rank, 0.25 * rank, 3.0])
    buckets = summer.finish(trailer=trailer)
    result["collectives_with_trailer"] = calls[0]
    result["err_trailer"] = compare(buckets, params, reference(params))
    result["trailer"] = trailer.tolist()
    result["trailer_second_step"] = second_step_trailer(summer, params, loss)

    # f) all_reduce_flat: a float32 trailer rides in float32 buckets; a float64 one travels alone, exactly
    grads = [p.grad for p in params]
    calls[0] = 0
    buckets = all_reduce_flat(grads, cap_mb=1.0, trailer=(t32 := torch.full((2,), 1.0 + rank)))
    result["flat_buckets"], result["flat_collectives"] = len(buckets), calls[0]
    result["err_flat"] = compare(buckets, params, reference(params))
    calls[0] = 0
    all_reduce_flat(grads, cap_mb=1.0, trailer=(t64 := torch.full((1,), 1 / 3 + rank, dtype=torch.float64)))
    result["flat_collectives_f64"] = calls[0]
    result["t32"], result["t64_exact"] = t32.tolist(), float(t64) == (1 / 3) + (1 / 3 + 1)

    # g) the local judgement: one norm per bucket, taken before the bucket leaves
    result.update(judged(summer, params, model, loss, rank))

    # d) not armed: hooks do nothing
    for p in params:
        p.grad = None
    before = len(summer._works)
    loss(True).backward()
    result["launched_unarmed"] = len(summer._works) - before
    summer.remove()
    print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
