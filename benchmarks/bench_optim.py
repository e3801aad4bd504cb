"""Step time of the lightning_opt optimizers vs ``torch.optim.Adam(foreach=True)`` and SGD + clip_grad_norm_.

Run: ``python -m benchmarks.bench_optim [--smoke] [--device cpu|cuda] [--reps N] [--threads N]``

Only ``optimizer.step()`` is timed (plus ``clip_grad_norm_`` for the SGD baseline), on a >= 10M-parameter
MLP-style model with fixed random gradients. All optimizers step the same parameter tensors, each with its
own state; they are timed in interleaved repetitions (one block of ``--inner`` steps per optimizer per
repetition, order rotated every repetition), and each optimizer's ratio to Adam is the median over
repetitions of (its block time / Adam's block time in the same repetition), for wall time and for process
CPU time (the latter is less sensitive to other processes competing for the cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lightning_opt.optim.acclip import ACClip
from lightning_opt.optim.clipped_sgd import ClippedSGD
from lightning_opt.optim.ingd import StochasticINGD
from lightning_opt.optim.normalized_sgd import NormalizedSGD


def build_model(width: int, blocks: int, vocab: int) -> torch.nn.Module:
    layers: list[torch.nn.Module] = [torch.nn.Embedding(vocab, width)]
    for _ in range(blocks):
        layers += [
            torch.nn.LayerNorm(width),
            torch.nn.Linear(width, 4 * width),
            torch.nn.GELU(),
            torch.nn.Linear(4 * width, width),
        ]
    return torch.nn.Sequential(*layers)


class Case:
    """One timed configuration: a step function and the gradients it sees."""

    def __init__(self, name: str, step: Callable[[], None], grads: list[torch.Tensor]) -> None:
        self.name, self.step, self.grads = name, step, grads


def make_cases(params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> list[Case]:
    def plain(opt: torch.optim.Optimizer) -> Callable[[], None]:
        return opt.step

    sgd = torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)
    clip_grads = [g.clone() for g in grads]  # clip_grad_norm_ rescales p.grad in place: own copy

    def sgd_clip() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        sgd.step()

    return [
        Case("Adam(foreach=True)", plain(torch.optim.Adam(params, lr=1e-3, foreach=True)), grads),
        Case("SGD(m=0.9) + clip_grad_norm_", sgd_clip, clip_grads),
        Case("ClippedSGD global (GClip), m=0", plain(ClippedSGD(params, lr=1e-3, max_norm=1.0)), grads),
        Case("ClippedSGD global (GClip), m=0.9",
             plain(ClippedSGD(params, lr=1e-3, max_norm=1.0, momentum=0.9)), grads),
        Case("ClippedSGD coordinate (CClip), m=0.9",
             plain(ClippedSGD(params, lr=1e-3, max_norm=1e-3, momentum=0.9, scope="coordinate")), grads),
        Case("NormalizedSGD, m=0.9", plain(NormalizedSGD(params, lr=1e-3, beta=1.0, momentum=0.9)), grads),
        Case("ACClip (defaults)", plain(ACClip(params)), grads),
        Case("StochasticINGD (defaults)", plain(StochasticINGD(params, seed=0)), grads),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 repetitions (checks it runs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--inner", type=int, default=3, help="steps per timed block")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    width, blocks, vocab = (64, 2, 100) if args.smoke else (512, 8, 1000)
    reps, inner = (2, 1) if args.smoke else (args.reps, args.inner)
    device = torch.device(args.device)
    model = build_model(width, blocks, vocab).to(device)
    params = list(model.parameters())
    grads = [1e-2 * torch.randn_like(p) for p in params]
    n_params = sum(p.numel() for p in params)
    cases = make_cases(params, grads)

    def run_block(case: Case, steps: int) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) per step."""
        for p, g in zip(params, case.grads, strict=True):
            p.grad = g
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            case.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps

    for case in cases:  # warm-up: allocates state
        run_block(case, 1)
    times: dict[str, list[float]] = {c.name: [] for c in cases}
    ratios: dict[str, list[float]] = {c.name: [] for c in cases}
    cpu_ratios: dict[str, list[float]] = {c.name: [] for c in cases}
    for r in range(reps):
        order = cases[r % len(cases) :] + cases[: r % len(cases)]
        block = {c.name: run_block(c, inner) for c in order}
        ref_wall, ref_cpu = block[cases[0].name]
        for name, (wall, cpu) in block.items():
            times[name].append(wall)
            ratios[name].append(wall / ref_wall)
            cpu_ratios[name].append(cpu / ref_cpu)

    print(
        f"# bench_optim: {n_params / 1e6:.1f}M parameters in {len(params)} tensors, device={device}, "
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, reps={reps} x {inner} steps"
    )
    print("| optimizer | median wall step time (ms) | ratio to Adam, wall | ratio to Adam, process CPU |")
    print("|---|---:|---:|---:|")
    for case in cases:
        print(
            f"| {case.name} | {1e3 * statistics.median(times[case.name]):.1f} "
            f"| {statistics.median(ratios[case.name]):.2f} | {statistics.median(cpu_ratios[case.name]):.2f} |"
        )

if __name__ == "__main__":
    main()
