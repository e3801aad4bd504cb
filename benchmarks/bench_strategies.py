"""Strategies on 2 CPU processes over loopback (gloo): bytes per optimizer step and steps/s, as ratios to DDP.

    python -m benchmarks.bench_strategies                      # τ ∈ {1, 4, 16} and the rows below, 200 steps
    python -m benchmarks.bench_strategies --smoke              # 30 steps, a few rows
    python -m benchmarks.bench_strategies --baseline REV       # also runs the code of git revision REV
    python -m benchmarks.bench_strategies --baseline DIR       # ... or of a copy of the package in DIR (no git needed)
    python -m benchmarks.bench_strategies --model deep         # a deep narrow MLP of 324 small tensors
    python -m benchmarks.bench_strategies --rows local_sgd_warmup:4,lookahead_sync:5   # some rows only

Every row is a fit of ``--steps`` steps, and all rows run one after the other in **one** pair of processes,
``--rounds`` times over (``benchmarks/scripts/strategy_rank.py``); ``--reps`` such pairs are launched (alternating
with the baseline's). A row's ratio to DDP is taken within a round, between fits seconds apart on the same cores and
process placement, and the median over all rounds is reported with its spread (max − min of the per-round ratios):
separate launches per row, as before, moved a ratio by ±15% between identical runs; each rank is pinned to a core
(``BENCH_PIN=0``: not), since the two ranks' placement made per-fit medians bimodal. The table is printed after
every launch (a run cut short still reports). DDP's bytes are its gradient all-reduce payload (4 bytes × parameters
per step). ``alone``: each rank trains by itself on a single-device strategy (the ceiling). "local step vs alone"
compares the median wall time of the steps that did not sync with the median step of ``alone`` in the same round;
"later local steps" leaves out the first step after each sync, which "first local step / later" compares with the
others. ``torch_loop`` is the control: a plain PyTorch loop of the same model that all-reduces its weights every τ
steps (no Lightning, none of our code), so its "first / later" is what a gloo collective costs the next step here.
``*_warmup``: every step is a warm-up step (gradients averaged during backward, as DDP does). ``--baseline``: the
rank script imports ``lightning_opt`` from a git worktree of REV or from DIR (via ``PYTHONPATH``), so "before" and
"after" come from one command.
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
        ("lsgd_warmup", 4), ("torch_loop", 4)]
SMOKE = [("alone", 1), ("ddp", 1), ("local_sgd", 4), ("lookahead_sync", 4)]
ROW_ORDER = {row: i for i, row in enumerate(dict.fromkeys(FULL + SMOKE))}


Results = dict[tuple[str, int, str], list[dict]]  # (row, τ, code) -> one entry per round


def launch(rows: list[tuple[str, int]], steps: int, rounds: int, tree: Path | None, model: str = "mlp") -> list[dict]:
    """One process pair running every row ``rounds`` times; rank 0's result per fit."""
    env = {"PYTHONPATH": str(tree)} if tree is not None else None
    spec = ",".join(f"{name}:{period}" for name, period in rows)
    outs = run_ranks(RANK_SCRIPT, spec, steps, rounds, model, world_size=2, timeout=1800, extra_env=env)
    return [json.loads(ln[len("RESULT "):]) for ln in outs[0].splitlines() if ln.startswith("RESULT ")]


def add_launch(results: Results, fits: list[dict], label: str, launch_id: int) -> None:
    """File each fit under its row, with the same round's DDP and alone figures beside it (the pairing)."""
    rounds: dict[int, dict[str, dict]] = {}
    for fit in fits:
        rounds.setdefault(fit["round"], {})[f"{fit['strategy']}:{fit['period']}"] = fit
    for by_row in rounds.values():
        ddp, alone = by_row["ddp:1"], by_row["alone:1"]
        for fit in by_row.values():
            local, first, later = fit["local_step_ms"], fit.get("first_local_ms"), fit.get("later_local_ms")
            results.setdefault((fit["strategy"], fit["period"], label), []).append({
                **fit, "launch": launch_id, "vs_ddp": fit["steps_per_s"] / ddp["steps_per_s"],
                "local_vs_alone": alone["local_step_ms"] / local if local else None,
                "later_vs_alone": alone["local_step_ms"] / later if later else None,
                "first_vs_later": first / later if first and later else None})


def _median(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def _spread(runs: list[dict], key: str) -> str:
    values = [r[key] for r in runs if r.get(key) is not None]
    return f"{min(values):.2f}–{max(values):.2f}" if values else "—"


def report(results: Results, steps: int) -> None:
    ddp, alone = results[("ddp", 1, "this")], results[("alone", 1, "this")]
    launches = len({r["launch"] for r in ddp})
    print(f"model: {ddp[0]['params']:,} parameters; {steps} steps per fit; 2 gloo processes on loopback; "
          f"{len(ddp)} rounds in {launches} launch(es); DDP {_median(ddp, 'steps_per_s'):.1f} steps/s, alone "
          f"{_median(alone, 'steps_per_s'):.1f} steps/s per rank (medians)\n")
    print("| strategy | τ | code | bytes/step | bytes vs DDP | steps/s | steps/s vs DDP | range over rounds | "
          "local step vs alone | range over rounds | later local steps vs alone | first local step / later | "
          "final loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ddp_bps = ddp[0]["bytes_per_step"]
    for (name, period, tree), runs in results.items():
        bps = runs[0]["bytes_per_step"]
        local = _median(runs, "local_vs_alone")
        print(f"| {name} | {period} | {tree} | {bps:,.0f} | {bps / ddp_bps if ddp_bps else 0:.3f} | "
              f"{_median(runs, 'steps_per_s'):.1f} | {_median(runs, 'vs_ddp'):.3f} | {_spread(runs, 'vs_ddp')} | "
              f"{_fmt(local)} | {_spread(runs, 'local_vs_alone')} | {_fmt(_median(runs, 'later_vs_alone'))} | "
              f"{_fmt(_median(runs, 'first_vs_later'))} | {_median(runs, 'loss'):.3f} |", flush=True)


def _fmt(x: float) -> str:
    return f"{x:.3f}" if x == x else "—"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--reps", type=int, default=2, help="process pairs launched per code tree")
    ap.add_argument("--rounds", type=int, default=3, help="times every row runs in one process pair")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rows", default=None,
                    help="name:τ,... to run instead of the full list (alone:1 and ddp:1 are always added)")
    ap.add_argument("--model", choices=["mlp", "deep"], default="mlp",
                    help="deep: 80 blocks of Linear + LayerNorm (324 small tensors), where per-parameter work shows")
    ap.add_argument("--baseline", default=None,
                    help="git revision to compare with (run from a worktree), or a directory holding lightning_opt/")
    args = ap.parse_args()
    steps = 30 if args.smoke else args.steps
    rows = SMOKE if args.smoke else FULL
    if args.rows:
        picked = [(name, int(tau)) for name, tau in (r.split(":") for r in args.rows.split(","))]
        rows = [("alone", 1), ("ddp", 1)] + [r for r in picked if r not in (("alone", 1), ("ddp", 1))]
    with tempfile.TemporaryDirectory() as tmp:
        trees: dict[str, Path | None] = {"this": None}
        worktree = args.baseline is not None and not Path(args.baseline).is_dir()
        if args.baseline and not worktree:
            trees["before"] = Path(args.baseline).resolve()
        elif worktree:
            base = Path(tmp) / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.baseline],
                           check=True, capture_output=True)
            trees[args.baseline] = base
        try:
            results: Results = {}
            for rep in range(1 if args.smoke else args.reps):
                for label, tree in trees.items():
                    fits = launch(rows, steps, 1 if args.smoke else args.rounds, tree, args.model)
                    add_launch(results, fits, label, rep)
                    print(f"\n## after launch {rep + 1} of {label}\n", flush=True)
                    report(dict(sorted(results.items(), key=lambda kv: ROW_ORDER[kv[0][:2]])), steps)
        finally:
            if worktree:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)


if __name__ == "__main__":
    main()
