"""One implementation, two Lightning packages: the import hook's rules, and the CLI with only one of them."""

import pytest
from dist import run_script

from lightning_opt import _flavour

pytestmark = pytest.mark.timeout(300)


def test_rewrite_keeps_lines_and_only_touches_lightning_facing_names():
    src = ("import pytorch_lightning as pl\nfrom lightning_opt.strategies.periodic import PeriodicSyncStrategy\n"
           "from lightning_opt.strategies.schedules import PeriodSchedule\nfrom lightning_opt.optim import ACClip\n"
           "x = 'lightning_opt.callbacks.GradNormMonitor'\n")
    out = _flavour.rewrite(src, "lightning", "lightning_opt.lightning")
    assert out.splitlines() == [
        "import lightning.pytorch as pl",
        "from lightning_opt.lightning.strategies.periodic import PeriodicSyncStrategy",
        "from lightning_opt.strategies.schedules import PeriodSchedule",  # pure: one module for both packages
        "from lightning_opt.optim import ACClip",
        "x = 'lightning_opt.lightning.callbacks.GradNormMonitor'",
    ]


@pytest.mark.parametrize(("module", "facing"), [
    ("strategies", True), ("strategies.periodic", True), ("strategies.local_sgd", True), ("callbacks", True),
    ("callbacks.sharpness", True), ("tensorboard", True), ("cli", True), ("examples.charlm", True),
    ("strategies.schedules", False), ("strategies.errors", False), ("strategies.curvature_period", False),
    ("callbacks._budget", False),
])
def test_which_modules_are_served_per_package(module, facing):
    assert _flavour.lightning_facing(module) is facing


def test_both_namespaces_share_pure_modules_and_errors(flavour):
    from lightning_opt.strategies.errors import NonFiniteError
    from lightning_opt.strategies.schedules import ConstantHorizon

    assert flavour.strategies.NonFiniteError is NonFiniteError
    strategy = flavour.strategies.LocalSGDStrategy(period=ConstantHorizon(0.4))
    assert isinstance(strategy, flavour.pl.strategies.Strategy)
    assert isinstance(flavour.callbacks.GradNormMonitor(), flavour.pl.Callback)


@pytest.mark.parametrize("hidden", ["pytorch_lightning", "lightning"])
def test_cli_with_only_one_lightning_package_installed(hidden, tmp_path):
    out = run_script("hidden_package.py", hidden, "fit", "--config", "examples/configs/quickstart.yaml",
                     "--trainer.devices=1", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                     f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
                     timeout=240, fresh=True).stdout
    used = "lightning" if hidden == "pytorch_lightning" else "pytorch_lightning"
    assert f"DEFAULT {used} TRAINER {_flavour.PACKAGES[used]}.trainer.trainer STEPS 2" in out
