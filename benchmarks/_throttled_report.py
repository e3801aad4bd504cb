"""Figures and tables of ``benchmarks/bench_throttled.py`` from the ranks' ``RESULT`` lines. Never imports torch."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
from pathlib import Path

STREAMING = ["stream_fp32", "stream_bf16", "stream_int8"]
ALL_STRATEGIES = ["alone", "ddp", "local_sgd", "lsgd", "lookahead_local", *STREAMING]
DEFAULT_STRATEGIES = ["alone", "ddp", "local_sgd", *STREAMING]


def labels(period: int, fragments: int, overlap: int, mix: float) -> dict[str, str]:
    stream = f"P {fragments}, d {overlap}, m {mix:g}"
    return {"alone": "alone (no communication)", "ddp": "DDP", "local_sgd": f"LocalSGDStrategy (τ {period})",
            "lsgd": "LSGDStrategy (pull 0.5)", "lookahead_local": 'LookaheadStrategy(mode="local", α 0.5)',
            "stream_fp32": f"streaming fp32 ({stream})", "stream_bf16": f"streaming bf16 ({stream})",
            "stream_int8": f"streaming int8 ({stream})"}


CAVEATS = """Reading the figures:
- Time to target uses *training* loss: the mean over the two ranks of each rank's minibatch loss on its own local
  weights (no consensus-model evaluation, which would add communication), smoothed over τ steps. The trajectories are
  deterministic (a streamed fragment's outer gradient is applied exactly d steps after it is sent, however long it
  took to arrive), so the step at which the target is reached is the same on both links and in every repetition;
  only the wall time varies. "Steps to target" is that step.
- "alone": each rank trains its own copy on its own shard with no communication at all (Lightning's single-device
  strategy), both ranks at the same time: the steps/s ceiling on this machine. Its loss is the mean of two models
  that never meet, so its time to target is not a statistical-efficiency reference.
- Steps/s is rank 0's, from the end of its 4th optimizer step to the end of its last. The throttled figures are
  bounded by the link: one DDP step moves the whole gradient through the capped link (gloo's ring all-reduce sends
  about one model's worth of bytes in each direction); one Local SGD / Lookahead sync moves one model's worth of
  parameters the same way, every τ steps; a streamed sync moves one fragment's outer gradient (fp32, bf16 or int8
  with one fp32 scale per 4096 values), sent while training goes on and waited for d steps later.
- Bytes are rank 0's `CommMeter` figures (`bytes`: what this rank put on the wire for training; `peak_bytes_per_sync`:
  the most one sync moved) — for DDP one fp32 gradient all-reduce per step, for "alone" 0. Fragments are cut at
  parameter boundaries, so with this MLP (two big width×width matrices) a fragment can hold about half the model:
  see the peak column. "Overlap wait" is rank 0's time blocked waiting for a fragment still in flight
  (`overlap_wait_seconds`); the other rank's is listed under the table.
- A DDP row marked "(N steps)" ran only N steps on that link (`--ddp-steps`): its steps/s and bytes are from those
  N steps; its time to target, when not reached within them, is estimated ("≈ … est.") as its last step's time
  plus the missing steps (taken from the loopback run, same trajectory) at its steps/s.
- LSGD's bytes are half of Local SGD's because the leader's weights are *broadcast* (one direction) rather than
  all-reduced; the sender is released earlier (socket buffering) and computes meanwhile. Lookahead (mode "local",
  α 0.5) moves the slow weights only half-way to the average every τ steps, so it progresses more slowly per step.
- `tbf` caps each veth end's egress, so the link is full-duplex at the given rate; no latency is added
  (`netem` is not available on these kernels).
"""


def summarise_fit(r0: dict, r1: dict, window: int, target: float) -> dict:
    """Per-fit figures: rank 0's steps/s, times and bytes; loss = mean over both ranks, trailing mean over
    ``window``."""
    loss = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    smooth = [statistics.fmean(loss[max(0, i - window + 1):i + 1]) for i in range(len(loss))]
    hit = next((i for i in range(window - 1, len(smooth)) if smooth[i] <= target), None)
    return {"sps": r0["steps_per_s"], "bytes": r0["bytes_total"], "peak": r0["peak_bytes_per_sync"],
            "wait": r0["overlap_wait_s"], "wait1": r1["overlap_wait_s"], "sync_s": r0["sync_s"],
            "syncs": r0["syncs"], "final": smooth[-1], "steps": r0["steps"],
            "ttt": None if hit is None else r0["times"][hit], "ttt_step": None if hit is None else hit + 1,
            "wall": r0["times"][-1], "params": r0["params"]}


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def aggregate(fits: list[dict]) -> dict:
    reached = [f["ttt"] for f in fits if f["ttt"] is not None]
    agg = {k: _median([f[k] for f in fits]) for k in ("sps", "bytes", "final", "wait", "wait1", "sync_s", "wall")}
    return {**agg, "peak": max(f["peak"] for f in fits), "steps": fits[0]["steps"], "n": len(fits),
            "n_reached": len(reached), "ttt": _median(reached), "ttt_step": _median([f["ttt_step"] for f in fits]),
            "est": False, "fits": fits}


def estimate_capped(results: dict[str, dict[str, dict]], full_steps: int) -> None:
    """A capped fit (fewer steps than ``full_steps``) that did not reach the target gets an estimated time to target
    from another link's step reached (the trajectory is the same): its last step's time plus the missing steps at
    its own steps/s."""
    for aggs in results.values():
        for name, a in aggs.items():
            if a["steps"] >= full_steps or a["ttt"] is not None:
                continue
            ref = next((o[name]["ttt_step"] for o in results.values()
                        if name in o and o[name]["steps"] >= full_steps and o[name]["ttt_step"] is not None), None)
            if ref is not None:
                a.update(ttt=a["wall"] + (ref - a["steps"]) / a["sps"], ttt_step=ref, est=True)


def _mb(nbytes: float | None) -> str:
    return "—" if nbytes is None else f"{nbytes / 1e6:.2f} MB"


def table(link: str, agg: dict[str, dict], target: float, names: dict[str, str], full_steps: int) -> str:
    alone, ddp = agg.get("alone"), agg.get("ddp")
    lines = [f"| link | strategy | steps/s (median) | vs alone | vs DDP | steps to loss ≤ {target:g} | time to it "
             "(median) | time-to-target speed-up vs DDP | total bytes | peak bytes / sync | overlap wait | "
             "final loss |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in agg.items():
        label = names[name] + ("" if a["steps"] >= full_steps else f" ({a['steps']} steps)")
        vs_alone = f"{a['sps'] / alone['sps']:.2f}×" if alone else "—"
        vs_ddp = f"{a['sps'] / ddp['sps']:.2f}×" if ddp else "—"
        if a["ttt"] is None:
            ttt, step, speed = "not reached", "—", "—"
        else:
            part = "" if a["est"] or a["n_reached"] == a["n"] else f" ({a['n_reached']}/{a['n']} reps)"
            ttt = f"≈ {a['ttt']:.1f} s est." if a["est"] else f"{a['ttt']:.1f} s{part}"
            step = f"{a['ttt_step']:.0f}"
            approx = "≈ " if a["est"] or (ddp is not None and ddp["est"]) else ""
            speed = (f"{approx}{ddp['ttt'] / a['ttt']:.2f}×" if ddp is not None and ddp["ttt"] is not None
                     else "—")
        wait = "—" if a["wait"] is None else f"{a['wait']:.2f} s"
        final = f"{a['final']:.3f}" + ("" if a["steps"] >= full_steps else f" (step {a['steps']})")
        lines.append(f"| {link} | {label} | {a['sps']:.2f} | {vs_alone} | {vs_ddp} | {step} | {ttt} | {speed} | "
                     f"{_mb(a['bytes'])} | {_mb(a['peak'])} | {wait} | {final} |")
    return "\n".join(lines)


def spread(results: dict[str, dict[str, dict]], names: dict[str, str]) -> str:
    lines = []
    for link, aggs in results.items():
        for name, a in aggs.items():
            line = f"- {link} {names[name]}: steps/s per repetition " + ", ".join(f"{f['sps']:.2f}" for f in a["fits"])
            if a["wait"] is not None:
                line += ("; overlap wait rank 0 / rank 1 per repetition " + ", ".join(
                    f"{f['wait']:.2f}/{f['wait1']:.2f} s" for f in a["fits"]))
            if a["sync_s"] is not None:
                line += f"; {a['fits'][0]['syncs']} syncs, {a['sync_s']:.2f} s blocked in them (rank 0, median)"
            lines.append(line)
    return "\n".join(lines)


def goal_lines(link: str, agg: dict[str, dict], period: int, rate: str) -> list[str]:
    """The streaming goal (and issue 11's Local SGD vs DDP goal) on one link, for the rows that were run."""
    out, parts, ok = [], [], True
    streams = [n for n in STREAMING if n in agg]
    if streams and "alone" in agg:
        ratios = {n: agg[n]["sps"] / agg["alone"]["sps"] for n in streams}
        ok &= all(r >= 0.9 for r in ratios.values())
        parts.append("steps/s vs alone " + ", ".join(f"{n[7:]} {r:.2f}×" for n, r in ratios.items()))
    lsgd = agg.get("local_sgd", {}).get("ttt_step")
    if streams and lsgd is not None:
        steps = {n: agg[n]["ttt_step"] for n in streams}
        ok &= all(s is not None and s <= 1.1 * lsgd for s in steps.values())
        parts.append(f"steps to target vs Local SGD's {lsgd:.0f}: " + ", ".join(
            f"{n[7:]} " + ("not reached" if s is None else f"{s:.0f} ({s / lsgd:.2f}×)") for n, s in steps.items()))
    if "stream_int8" in agg and "stream_fp32" in agg:
        f8, f32 = agg["stream_int8"]["final"], agg["stream_fp32"]["final"]
        rel = abs(f8 - f32) / f32
        ok &= rel <= 0.01
        parts.append(f"int8 final loss {f8:.4f} vs fp32 {f32:.4f} ({rel * 100:.2f} % apart)")
    if parts:
        out.append(f"Goal on the {link} link — streaming ≥ 0.9× the no-communication ceiling in steps/s; target "
                   "within 1.1× Local SGD's steps; int8 final loss within 1% of fp32: "
                   f"{'met' if ok else 'NOT met'} ({'; '.join(parts)}).")
    if link == "throttled" and "local_sgd" in agg and "ddp" in agg:
        ratio = agg["local_sgd"]["sps"] / agg["ddp"]["sps"]
        out.append(f"Issue 11 goal, Local SGD (τ = {period}) ≥ 3× DDP's steps/s on the {rate} link: "
                   f"{'met' if ratio >= 3 else 'NOT met'} ({ratio:.2f}×).")
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = []
    for dist in ("torch", "pytorch-lightning"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} not installed")
    return (f"{cpu}, {os.cpu_count()} logical CPUs, Linux {platform.release()}, Python {platform.python_version()}, "
            + ", ".join(versions))
