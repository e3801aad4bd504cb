"""Faults under torchrun (issue 22): what a lost worker costs with AutoResume, and what checkpointing after every
sync costs without one. Two gloo processes on loopback, the benchmark MLP, DiLoCo-style Local SGD (τ = 8).

    python -m benchmarks.bench_fault             # each job once (about a minute on 2 cores)
    python -m benchmarks.bench_fault --smoke     # the same (the jobs are already short)

Rows: time from the kill (rank 1 SIGKILLs itself after step 100) to the restarted job's first finished step,
steps redone (``fault/lost_steps``), checkpoint seconds and bytes per sync (rank 0, medians of the job without a
kill), and the wall time of 240 steps with and without AutoResume. The kill job also runs once with torchrun's
shared rendezvous store (its default), to show whether the restart connects (PyTorch issue #135712).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lightning_opt.testing import dist_env

SCRIPT = Path(__file__).parent / "scripts" / "fault_rank.py"
SHARED_TIMEOUT = 120  # the shared-store restart can hang until the collective timeout (600 s) instead of failing


def torchrun(out: Path, mode: str, shared_store: bool = False, timeout: float = 600) -> tuple[int | None, str]:
    """torchrun's exit code (``None``: still running after ``timeout`` s, then killed with its workers) and its
    output."""
    env = dist_env({"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                    os.environ.get("PYTHONPATH", "")])})
    if not shared_store:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "--max-restarts=1", str(SCRIPT), str(out), mode], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        return proc.wait(timeout=timeout), proc.communicate()[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return None, proc.communicate()[0]


def values(result: dict, key: str) -> list[float]:
    return [m[key] for m in result["logged"] if key in m]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for mode in ("none", "ckpt", "kill"):
            code, log = torchrun(out, mode)
            if code != 0:
                raise SystemExit(f"{mode}: torchrun exit {code}\n{log[-3000:]}")
        res = {mode: json.loads((out / f"{mode}.json").read_text()) for mode in ("none", "ckpt", "kill")}
        back = res["kill"]["first_step_end"] - float((out / "killed_at").read_text())
        (out / "shared").mkdir()
        code, log = torchrun(out / "shared", "kill", shared_store=True, timeout=SHARED_TIMEOUT)
        shared = {0: "completed", None: f"still running after {SHARED_TIMEOUT} s (killed)"}.get(
            code, f"failed (torchrun exit {code})")
        failed_connects = log.count("connectFullMesh failed")
    kill, ckpt, none = res["kill"], res["ckpt"], res["none"]
    ckpt_s, ckpt_b = values(ckpt, "fault/checkpoint_seconds"), values(ckpt, "fault/checkpoint_bytes")
    print("| figure | value |\n|---|---|")
    print(f"| attempt that finished the killed job | {kill['attempt'] + 1} |")
    print(f"| `fault/restarts` / `fault/lost_steps` (a checkpoint every 8 steps) | "
          f"{values(kill, 'fault/restarts')} / {values(kill, 'fault/lost_steps')} |")
    print(f"| kill → first finished step of the restarted job | {back:.1f} s |")
    print(f"| checkpoint after a sync: seconds (median of {len(ckpt_s)}) | {statistics.median(ckpt_s):.4f} s |")
    print(f"| checkpoint after a sync: bytes (both ranks' weights and optimizer states, anchor, outer momentum) | "
          f"{statistics.median(ckpt_b):,.0f} |")
    print(f"| 240 steps without / with AutoResume | {none['seconds']:.2f} s / {ckpt['seconds']:.2f} s "
          f"({ckpt['seconds'] / none['seconds']:.2f}×) |")
    print(f"| the kill job with torchrun's shared rendezvous store (its default) | {shared}; "
          f"{failed_connects} failed connects |")


if __name__ == "__main__":
    main()
