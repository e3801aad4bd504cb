"""Issue 22 on real processes under torchrun: a SIGKILLed rank, torchrun's ``--max-restarts`` and AutoResume bring
the job to the uninterrupted run's weights by themselves (Local SGD with outer momentum, LSGD, Lookahead), and a
restart with another world size continues from the consensus (``tests/scripts/elastic_rank.py``).

``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: torchrun otherwise shares its rendezvous store with the restarted
workers' process group, which then finds the previous attempt's addresses and fails to connect (PyTorch issue
#135712; measured here: 4 of 4 restarts failed so). AutoResume warns when it runs under such a torchrun."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from dist import SCRIPTS, dist_env, run_command

pytestmark = pytest.mark.timeout(400)

CASES = ("local_sgd_outer", "lsgd", "lookahead")
CHECKPOINT_INTERVAL = 6  # every 2nd sync, period 3


def _torchrun(out, mode: str, nproc: int, max_restarts: int = 0) -> None:
    env = dist_env({"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    run_command([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                 f"--max-restarts={max_restarts}", SCRIPTS / "elastic_rank.py", out, mode], timeout=360, env=env,
                fresh=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic")
    _torchrun(out / "kill", "kill", nproc=2, max_restarts=len(CASES))
    _torchrun(out / "plain", "plain", nproc=2)
    return out


def _result(run_dir, rank: int, tag: str = "") -> dict:
    return torch.load(run_dir / f"rank{rank}{tag}.pt", weights_only=False)


@pytest.mark.parametrize("case", CASES)
def test_a_killed_rank_costs_a_restart_not_the_run(runs, case):
    for rank in (0, 1):
        resumed, plain = _result(runs / "kill" / case, rank), _result(runs / "plain" / case, rank)
        assert resumed["attempt"] == CASES.index(case) + 1  # finished in the attempt after its kill
        torch.testing.assert_close(resumed["weights"], plain["weights"], atol=1e-6, rtol=0)
    logged = dict(kv for _, m in _result(runs / "kill" / case, 0)["logged"] for kv in m.items()
                  if kv[0].startswith("fault/") and "checkpoint" not in kv[0])
    assert logged["fault/restarts"] == 1
    assert 0 <= logged["fault/lost_steps"] <= CHECKPOINT_INTERVAL
    killed_at = float((runs / "kill" / case / "killed_at").read_text())
    assert _result(runs / "kill" / case, 0)["training_again"] - killed_at < 120


def test_a_restart_with_another_world_size_continues_from_the_consensus(runs, tmp_path):
    shutil.copytree(runs / "plain", tmp_path / "resize")
    _torchrun(tmp_path / "resize", "resize", nproc=1)
    result = _result(tmp_path / "resize" / "local_sgd_outer", 0, "_world1")
    assert any("written with world size 2, resuming with 1" in w for w in result["warnings"]), result["warnings"]
    assert result["steps_run"] == 18 - 12  # resumed from the checkpoint after step 12
    start, end = result["full_loss"]
    assert start == pytest.approx(_result(runs / "plain" / "local_sgd_outer", 0)["full_loss"][1], abs=1e-6)
    assert end < 0.8 * start  # training goes on from the consensus (the loss on all 96 samples)
