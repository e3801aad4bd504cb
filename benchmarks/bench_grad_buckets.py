"""What an averaged step's own per-tensor work costs, in one process: the pieces issue 18's fifth session changed.

    python -m benchmarks.bench_grad_buckets            # both models, 200 backward passes per configuration, 5 rounds
    python -m benchmarks.bench_grad_buckets --smoke    # a few passes (checks that it runs)

The models are the strategy benchmark's (``benchmarks/scripts/_mlp.py``): the MLP (8 tensors) and the deep narrow
one (80 blocks, 324 tensors), one batch of 32, one thread. Every configuration runs once per round, interleaved, and
the table gives the median per pass and its ratio to a plain backward:

* ``backward``: no hooks (the floor);
* ``hooks that do nothing``: what a Python hook per parameter costs by itself;
* ``hooks, copy per tensor``: a post-accumulate hook per parameter copying its gradient into its place in a flat
  buffer (what the hooks did before; one ``copy_`` call per tensor);
* ``OverlappedGradSum, armed``: the strategies' averaged-step path after backward, judgement and write-back included
  (hooks that only mark readiness, a bucket copied by one multi-tensor copy, one norm per bucket, the means written
  through kept views), on a process group of one rank, so the collectives cost next to nothing and what is left is
  our own work;
* ``DDP (its C++ reducer)``: the same forward and backward through ``DistributedDataParallel`` on the same group of
  one rank: the copies into buckets, the all-reduce and the copies back that DDP does in C++, the reference for the
  row above.

Then the three per-step operations replaced, timed alone: the non-finite check (one norm per tensor vs one per flat
bucket) and the write-back (views built by ``_unflatten_dense_tensors`` at every step vs views kept).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _unflatten_dense_tensors

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from _mlp import BenchMLP  # noqa: E402

from lightning_opt.distributed.consensus import agree  # noqa: E402
from lightning_opt.distributed.overlap import OverlappedGradSum  # noqa: E402


def model(deep: bool) -> nn.Module:
    net = BenchMLP(lambda: None, in_dim=64, width=64 if deep else 512, classes=10, batch_size=32, world=1,
                   blocks=80 if deep else 0).net
    return net


def timed(fn: Callable[[], None], passes: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(passes):
        fn()
    return (time.perf_counter() - start) / passes * 1e3


def _nothing(p: torch.Tensor) -> None:
    return None


def _copy_into(view: torch.Tensor) -> Callable[[torch.Tensor], None]:
    def hook(p: torch.Tensor) -> None:
        view.copy_(p.grad)

    return hook


def step_rows(deep: bool, passes: int, rounds: int) -> list[str]:
    net = model(deep)
    params = list(net.parameters())
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    views = list(_unflatten_dense_tensors(torch.empty(sum(p.numel() for p in params)), params))

    def backward() -> None:
        for p in params:
            p.grad = None
        nn.functional.cross_entropy(net(x), y).backward()

    def attached(make: Callable[[], list], run: Callable[[], None]) -> float:
        handles = make()  # hooks live only while their configuration is timed
        try:
            return timed(run, passes)
        finally:
            for h in handles:
                h.remove()

    def empty_hooks() -> float:
        return attached(lambda: [p.register_post_accumulate_grad_hook(_nothing) for p in params], backward)

    def copy_hooks() -> float:
        return attached(lambda: [p.register_post_accumulate_grad_hook(_copy_into(v)) for p, v in zip(params, views)],
                        backward)

    def armed() -> float:
        summer = OverlappedGradSum(params, cap_mb=25.0)

        def step() -> None:
            summer.arm()
            backward()
            grads = [p.grad for p in params]
            agree(grads, policy="raise", what="gradients", step=0, summed=summer).write(grads)

        return attached(lambda: summer._hooks, step)

    def ddp() -> float:
        wrapped = nn.parallel.DistributedDataParallel(net)  # no buffers in these models: nothing to broadcast

        def step() -> None:
            for p in params:
                p.grad = None
            nn.functional.cross_entropy(wrapped(x), y).backward()

        return timed(step, passes)  # its reducer (and its hooks) go when `wrapped` does, on return

    runs = {"backward": lambda: timed(backward, passes), "hooks that do nothing": empty_hooks,
            "hooks, copy per tensor": copy_hooks,
            "OverlappedGradSum, armed": armed, "DDP (its C++ reducer)": ddp}
    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            results[name].append(run())
    base = statistics.median(results["backward"])
    label = f"deep ({len(params)} tensors)" if deep else f"MLP ({len(params)} tensors)"
    return [f"| {label} | {name} | {statistics.median(t):.3f} | {statistics.median(t) / base:.3f} |"
            for name, t in results.items()]


def piece_rows(passes: int) -> list[str]:
    params = list(model(True).parameters())
    grads = [torch.randn_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    kept = list(_unflatten_dense_tensors(flat, grads))
    pieces = {
        "non-finite check, a norm per tensor": lambda: torch._foreach_norm(grads),
        "non-finite check, a norm per flat bucket": lambda: torch.linalg.vector_norm(flat),
        "write-back, views built every step": lambda: torch._foreach_copy_(
            grads, _unflatten_dense_tensors(flat, grads)),
        "write-back, views kept": lambda: torch._foreach_copy_(grads, kept),
    }
    return [f"| deep ({len(params)} tensors) | {name} | {timed(fn, passes):.3f} | — |" for name, fn in pieces.items()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    passes, rounds = (3, 1) if args.smoke else (200, 5)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        print(f"{passes} passes per configuration and round, {rounds} round(s), 1 thread, batch 32\n")
        print("| model | configuration | ms per pass (median) | vs backward |")
        print("|---|---|---:|---:|")
        for row in step_rows(False, passes, rounds) + step_rows(True, passes, rounds) + piece_rows(passes):
            print(row)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
