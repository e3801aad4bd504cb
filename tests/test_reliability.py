"""Faults: a SIGKILLed rank makes the survivor fail fast with a clear error; the last checkpoint on disk loads and
resuming from it reproduces the uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from dist import SCRIPTS, dist_env, run_command, run_ranks

pytestmark = pytest.mark.timeout(400)


def test_killed_rank_fails_fast_and_checkpoint_resumes_exactly(tmp_path):
    env0 = dist_env()
    procs = []
    for r in (0, 1):
        env = dict(env0, LOCAL_RANK=str(r), NODE_RANK="0", WORLD_SIZE="2", RANK=str(r))
        procs.append(subprocess.Popen([sys.executable, str(SCRIPTS / "killed_rank.py"), str(tmp_path), "fault"],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      start_new_session=True))
    try:
        procs[1].wait(timeout=200)
        killed_at = time.monotonic()
        out0, _ = procs[0].communicate(timeout=90)
        survivor_exit = time.monotonic() - killed_at
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == -9
    assert procs[0].returncode != 0, "the surviving rank should fail, not hang or succeed"
    assert survivor_exit <= 60, f"survivor took {survivor_exit:.0f}s to fail"
    assert any(word in out0 for word in ("Connection", "closed", "Gloo", "gloo", "timed out", "peer")), out0[-3000:]

    # epoch 0 and 1 checkpoints were written before the fault (rank 1 died at step 15, in epoch 2)
    last = tmp_path / "ckpt" / "epoch=1.ckpt"
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["global_step"] == 12 and "lightning_opt" in ckpt
    assert not list((tmp_path / "ckpt").glob("*.tmp*")), "partial checkpoint left behind"

    run_ranks("killed_rank.py", tmp_path, "resume", last, timeout=300)
    run_ranks("killed_rank.py", tmp_path, "full", timeout=300)
    for r in (0, 1):
        torch.testing.assert_close(torch.load(tmp_path / f"resume_rank{r}.pt"),
                                   torch.load(tmp_path / f"full_rank{r}.pt"), atol=1e-6, rtol=0)

    # a different world size resumes from the consensus, with a warning
    run_ranks("killed_rank.py", tmp_path, "resume1", last, world_size=1, timeout=300)
    assert "world size 2" in (tmp_path / "resume1_rank0.warnings").read_text()
    assert torch.isfinite(torch.load(tmp_path / "resume1_rank0.pt")).all()


RELEASE = """
import atexit, os, torch.distributed as dist
from lightning_opt.distributed.lifecycle import release_at_exit
atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))  # runs last (LIFO)
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["MASTER_PORT"], rank=0, world_size=1)
release_at_exit()
release_at_exit()  # once per process
"""


def test_gloo_group_is_destroyed_before_the_interpreter_finalises():
    # a live gloo group at finalisation can abort the process (lifecycle.py); the strategies register this handler
    out = run_command([sys.executable, "-c", RELEASE], timeout=120).stdout
    assert "initialized at exit: False" in out


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it has already ended: its memory and port are released)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_stuck_rank_ends_with_the_job_instead_of_living_on_as_an_orphan(tmp_path):
    # rank 1 sleeps in training_step; rank 0 times out at the next sync and fails; Lightning's launcher does not
    # kill rank 1 then, so the strategy asks the kernel to end it with its launcher (lifecycle.die_with_parent)
    log = tmp_path / "log"
    with open(log, "w") as sink:  # a file, not a pipe: an orphan holding the pipe would block reading it
        # 20 s, not less: rank 0's first collective also waits for rank 1's interpreter to start, which takes
        # over 8 s on a loaded 2-core machine (`make test` runs two workers)
        proc = subprocess.Popen([sys.executable, str(SCRIPTS / "stuck_rank.py"), str(tmp_path), "20"],
                                env=dist_env(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=200)
        out = log.read_text()
        pid = int((tmp_path / "stuck.pid").read_text())
        deadline = time.monotonic() + 20
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(pid), "the stuck rank outlived the job"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode != 0 and "Timed out waiting 20000ms" in out, out[-3000:]


@pytest.mark.parametrize("name", ["LocalSGDStrategy", "LookaheadStrategy", "LSGDStrategy", "EASGDStrategy"])
def test_default_collective_timeout_is_ten_minutes(name):
    import datetime

    import lightning_opt.strategies as strategies

    assert getattr(strategies, name)()._timeout == datetime.timedelta(seconds=600)


def test_sigterm_on_rank_zero_during_local_steps_stops_every_rank_by_the_next_sync():
    # Lightning broadcasts rank 0's SIGTERM flag at the start of each batch; the strategies keep that broadcast
    # only on steps that communicate (strategies/_sigterm.py), so the other ranks learn it at the next sync:
    # rank 0 stops after step 5 (Lightning's own check), rank 1 at the start of step 8 (the sync after step 8),
    # both with SIGTERMException and without waiting for a timeout
    start = time.monotonic()
    outs = run_ranks(SCRIPTS / "sigterm_rank.py", timeout=120)
    ends = [next(ln for ln in out.splitlines() if ln.startswith(("STOPPED", "FINISHED"))) for out in outs]
    assert ends == ["STOPPED 0 5 SIGTERMException", "STOPPED 1 7 SIGTERMException"], outs
    assert time.monotonic() - start < 60  # the collective timeout (60 s) never struck
