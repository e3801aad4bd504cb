"""Strategies on 2 CPU processes over loopback (gloo): bytes per optimizer step and steps/s, as ratios to DDP.

    python -m benchmarks.bench_strategies            # full: τ ∈ {1, 4, 16}, 200 steps each
    python -m benchmarks.bench_strategies --smoke    # 30 steps, τ = 4 only

Runs are interleaved (DDP, then each strategy, repeated) so machine noise hits all of them alike; the median of the
repetitions is reported. DDP's bytes are its gradient all-reduce payload (4 bytes × parameters per step).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from lightning_opt.testing import run_ranks

RANK_SCRIPT = Path(__file__).parent / "scripts" / "strategy_rank.py"


def run_one(name: str, period: int, steps: int) -> dict:
    outs = run_ranks(RANK_SCRIPT, name, period, steps, world_size=2, timeout=600)
    line = next(ln for ln in outs[0].splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    steps = 30 if args.smoke else 200
    periods = [4] if args.smoke else [1, 4, 16]
    names = ["local_sgd", "lsgd", "lookahead_sync", "lookahead_local"]
    results: dict[tuple[str, int], list[dict]] = {}
    for _ in range(1 if args.smoke else args.reps):
        for period in periods:
            for name in ["ddp", *names]:
                key = (name, 1 if name == "ddp" else period)
                if name == "ddp" and period != periods[0]:
                    continue
                results.setdefault(key, []).append(run_one(name, period, steps))
    ddp = results[("ddp", 1)]
    ddp_sps = statistics.median(r["steps_per_s"] for r in ddp)
    ddp_bps = ddp[0]["bytes_per_step"]
    print(f"model: {ddp[0]['params']:,} parameters; {steps} steps; 2 gloo processes on loopback")
    print("| strategy | τ | bytes/step | bytes vs DDP | steps/s | steps/s vs DDP | final loss |")
    print("|---|---|---|---|---|---|---|")
    for (name, period), runs in sorted(results.items(), key=lambda kv: (kv[0][0] != "ddp", kv[0])):
        sps = statistics.median(r["steps_per_s"] for r in runs)
        bps = runs[0]["bytes_per_step"]
        print(f"| {name} | {period} | {bps:,.0f} | {bps / ddp_bps:.3f} | {sps:.1f} | {sps / ddp_sps:.2f} | "
              f"{statistics.median(r['loss'] for r in runs):.3f} |")


if __name__ == "__main__":
    main()
