"""Every launcher a Lightning user has (popen, spawn, fork / notebooks, torchrun) × every strategy with the
stateful callbacks, under both Lightning packages: identical trajectories, logged values and LSGD leader
histories (``tests/scripts/launchers.py`` runs all cases of one launcher in one invocation); torchrun also
checkpoints mid-period and resumes to the uninterrupted run. Plus: a notebook-style kernel (no ``__main__`` file),
the README's ``import lightning as L`` example, and every config in ``examples/configs`` on 2 processes."""

import math
import re
import sys
from pathlib import Path

import pytest
import torch
from dist import SCRIPTS, dist_env, run_command, run_ranks, run_script

pytestmark = pytest.mark.timeout(400)

ROOT = Path(__file__).resolve().parents[1]
CASES = ["local_sgd_outer", "lsgd", "lsgd_multi", "lookahead_sync", "lookahead_local", "easgd"]
# (launcher, Lightning package): each launcher once, each package under two launchers
RUNS = [("popen", "pytorch_lightning"), ("spawn", "lightning"), ("fork", "pytorch_lightning"),
        ("torchrun", "lightning")]
REFERENCE = RUNS[0]
# spawn re-imports both ranks for every fit (the slowest row): it runs the two cases whose objects hold state before
# the launch (LSGD's score window; between them, all four monitors' generators and buffers), which is what spawn
# could share between ranks
CASES_OF = {"spawn": ["lsgd", "lookahead_sync"]}
VOLATILE = re.compile(r"seconds|overhead|eval_bytes")  # wall-clock figures; bytes moved for checkpoint consensus


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def get(run):
        if run not in cache:
            launcher, package = run
            out = tmp_path_factory.mktemp(f"{launcher}_{package}")
            env = dist_env({"LIGHTNING_OPT_PACKAGE": package})
            if launcher == "torchrun":
                run_command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             SCRIPTS / "launchers.py", out, launcher], timeout=380, env=env, fresh=True)
            else:
                run_script("launchers.py", out, launcher, ",".join(CASES_OF.get(launcher, CASES)), timeout=380,
                           env=env, fresh=True)
            cache[run] = out
        return cache[run]

    return get


def _load(out, case, rank):
    return torch.load(out / f"{case}.rank{rank}.pt", weights_only=False)


def _logged(rows):
    return [(step, {k: v for k, v in values.items() if not VOLATILE.search(k)}) for step, values in rows]


def _same_values(a, b):
    assert len(a) == len(b)
    for (sa, va), (sb, vb) in zip(a, b):
        assert sa == sb and va.keys() == vb.keys(), (sa, sb, sorted(set(va) ^ set(vb)))
        for k in va:
            assert va[k] == vb[k] or (math.isnan(va[k]) and math.isnan(vb[k])), (sa, k, va[k], vb[k])


@pytest.mark.parametrize("run", RUNS[1:], ids=lambda r: f"{r[0]}-{r[1]}")
def test_launchers_give_identical_runs(runs, run):
    ref, other = runs(REFERENCE), runs(run)
    for case in CASES_OF.get(run[0], CASES):
        for rank in (0, 1):
            a, b = _load(ref, case, rank), _load(other, case, rank)
            assert torch.equal(a["params"], b["params"]), (case, rank)
            assert a["history"] == b["history"], (case, rank)
            _same_values(_logged(a["logged"]), _logged(b["logged"]))
        if case != "lookahead_sync":  # (whose inner steps are DDP steps)
            # the ranks trained on different shards: a launcher that shared state between them would show here
            assert not torch.equal(_load(other, case, 0)["params"][0], _load(other, case, 1)["params"][0]), case


def test_lsgd_scores_are_each_ranks_own(runs):
    """The reported bug: under spawn both ranks reported one shared score window."""
    history = _load(runs(("spawn", "lightning")), "lsgd", 0)["history"]
    assert history and all(scores[0] != scores[1] for _, scores, _ in history)


def test_stateful_callbacks_logged_under_every_launcher(runs):
    logged = {k for _, values in _load(runs(("spawn", "lightning")), "lsgd", 0)["logged"] for k in values}
    assert any(k.startswith("noise/") for k in logged) and any(k.startswith("time_avg/") for k in logged)
    logged = {k for _, values in _load(runs(("spawn", "lightning")), "lookahead_sync", 0)["logged"] for k in values}
    assert any(k.startswith("curvature/") for k in logged) and "grad/norm" in logged


def test_torchrun_checkpoint_mid_period_resumes_to_the_uninterrupted_run(runs):
    out = runs(("torchrun", "lightning"))
    for case in CASES:
        for rank in (0, 1):
            full, resumed = _load(out, case, rank), _load(out, f"{case}_resumed", rank)
            assert torch.equal(resumed["params"], full["params"][3:]), (case, rank)
            assert torch.equal(resumed["final"], full["final"]), (case, rank)


NOTEBOOK = """
import sys
sys.ps1 = ">>> "  # what Lightning checks to know it runs in an interactive kernel
import torch, lightning as L
import lightning_opt
from torch.utils.data import DataLoader, TensorDataset

class Net(L.LightningModule):   # defined in __main__ without a file: only fork can start the ranks
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
    def training_step(self, batch, _):
        return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)), batch_size=4)

net = Net()
before = net.layer.weight.detach().clone()
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="{strategy}", max_steps=6, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(net)
print("STATUS", trainer.state.status, "MOVED", float((net.layer.weight - before).abs().sum()) > 0)
"""


@pytest.mark.parametrize("strategy", ["local_sgd_notebook", "lsgd_notebook"])
def test_notebook_kernel_with_fork(strategy):
    out = run_command([sys.executable, "-c", NOTEBOOK.replace("{strategy}", strategy)], timeout=240).stdout
    assert "STATUS TrainerStatus.FINISHED MOVED True" in out


def test_a_one_process_fit_leaves_nothing_that_stops_a_two_process_fit_after_it():
    """A script (a sweep, a benchmark) that fits on one process and then on two: the one-process fit used to leave
    LOCAL_RANK / NODE_RANK / MASTER_* / OMP_NUM_THREADS and its gloo group behind, so the two-process fit started no
    rank (LOCAL_RANK made the process look externally launched) or forked ranks that hung in OpenMP."""
    script = NOTEBOOK.replace('sys.ps1 = ">>> "', "pass").replace("{strategy}", "local_sgd_notebook").replace(
        "net = Net()\n", 'L.Trainer(accelerator="cpu", devices=1, strategy="lookahead", max_steps=2, logger=False, '
        'enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False).fit(Net())\nnet = Net()\n')
    assert 'strategy="lookahead"' in script
    out = run_command([sys.executable, "-c", script], timeout=120).stdout
    assert "STATUS TrainerStatus.FINISHED MOVED True" in out


README_EXAMPLE = re.compile(r"```python\n(import lightning as L\n.*?)```", re.S)


def test_readme_first_example_trains_on_two_processes(tmp_path):
    code = README_EXAMPLE.search((ROOT / "README.md").read_text()).group(1)
    script = tmp_path / "readme_example.py"
    script.write_text(code)
    out = run_command([sys.executable, script], timeout=240, cwd=tmp_path).stdout
    assert "`Trainer.fit` stopped" in out


def test_every_example_config_trains_on_two_processes_under_lightning(tmp_path):
    configs = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
    run_ranks("run_configs.py", tmp_path, *configs, timeout=380, extra_env={"LIGHTNING_OPT_PACKAGE": "lightning"})
    for config in configs:
        assert (tmp_path / f"{config.stem}.rank1.done").exists(), config.name
    assert list((tmp_path / "quickstart").rglob("events.out.tfevents.*"))  # the quickstart's dashboard data
