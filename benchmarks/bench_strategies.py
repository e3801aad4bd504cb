"""Strategies on 2 CPU processes over loopback (gloo): bytes per optimizer step and steps/s, as ratios to DDP.

    python -m benchmarks.bench_strategies                      # τ ∈ {1, 4, 16} and the rows below, 200 steps
    python -m benchmarks.bench_strategies --smoke              # 30 steps, a few rows
    python -m benchmarks.bench_strategies --baseline REV       # also runs the code of git revision REV, interleaved

Runs are interleaved (every row, then again, ``--reps`` times) so machine noise hits all of them alike; the median of
the repetitions is reported. DDP's bytes are its gradient all-reduce payload (4 bytes × parameters per step).
``alone``: each rank trains by itself with no process group (the ceiling). "local step vs alone" compares the median
wall time of the steps that did not sync with the median step of ``alone``. ``*_warmup``: every step is a warm-up
step (gradients averaged during backward, as DDP does). ``--baseline``: the same rank script imports
``lightning_opt`` from a git worktree of REV (via ``PYTHONPATH``), so "before" and "after" come from one command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

from lightning_opt.testing import run_ranks

RANK_SCRIPT = Path(__file__).parent / "scripts" / "strategy_rank.py"
ROOT = Path(__file__).resolve().parents[1]
FULL = [("alone", 1), ("ddp", 1), ("local_sgd", 1), ("local_sgd", 4), ("local_sgd", 16), ("lsgd", 1), ("lsgd", 4),
        ("lookahead_sync", 5), ("lookahead_sync", 1), ("lookahead_local", 4), ("local_sgd_warmup", 4),
        ("lsgd_warmup", 4)]
SMOKE = [("alone", 1), ("ddp", 1), ("local_sgd", 4), ("lookahead_sync", 4)]
NOT_OURS = ("alone", "ddp")  # rows that run no lightning_opt strategy: once per repetition, not per code tree


def run_one(name: str, period: int, steps: int, tree: Path | None) -> dict:
    env = {"PYTHONPATH": str(tree)} if tree is not None else None
    outs = run_ranks(RANK_SCRIPT, name, period, steps, world_size=2, timeout=600, extra_env=env)
    line = next(ln for ln in outs[0].splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _median(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def report(results: dict, steps: int, trees: list[str]) -> None:
    ddp = results[("ddp", 1, trees[0])]
    alone = results[("alone", 1, trees[0])]
    ddp_sps, alone_ms = _median(ddp, "steps_per_s"), _median(alone, "local_step_ms")
    ddp_bps = ddp[0]["bytes_per_step"]
    print(f"model: {ddp[0]['params']:,} parameters; {steps} steps; 2 gloo processes on loopback; "
          f"DDP {ddp_sps:.1f} steps/s, alone {1000 / alone_ms:.1f} steps/s per rank ({alone_ms:.2f} ms/step)\n")
    print("| strategy | τ | code | bytes/step | bytes vs DDP | steps/s | steps/s vs DDP | local step vs alone | "
          "final loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, period, tree), runs in results.items():
        sps, local = _median(runs, "steps_per_s"), _median(runs, "local_step_ms")
        bps = runs[0]["bytes_per_step"]
        ratio_local = f"{alone_ms / local:.3f}" if local == local else "—"
        print(f"| {name} | {period} | {tree} | {bps:,.0f} | {bps / ddp_bps if ddp_bps else 0:.3f} | {sps:.1f} | "
              f"{sps / ddp_sps:.3f} | {ratio_local} | {_median(runs, 'loss'):.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--baseline", default=None, help="git revision to compare with (run from a worktree)")
    args = ap.parse_args()
    steps = 30 if args.smoke else args.steps
    rows = SMOKE if args.smoke else FULL
    with tempfile.TemporaryDirectory() as tmp:
        trees: dict[str, Path | None] = {"this": None}
        if args.baseline:
            base = Path(tmp) / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.baseline],
                           check=True, capture_output=True)
            trees = {"this": None, args.baseline: base}
        try:
            results: dict[tuple[str, int, str], list[dict]] = {}
            for _ in range(1 if args.smoke else args.reps):
                for name, period in rows:
                    for label, tree in trees.items():
                        if name in NOT_OURS and label != "this":
                            continue
                        results.setdefault((name, period, label), []).append(run_one(name, period, steps, tree))
            report(results, steps, list(trees))
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)


if __name__ == "__main__":
    main()
