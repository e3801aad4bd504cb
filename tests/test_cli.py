"""The `lightning-opt` CLI: help, registry names and class paths, 2-process gloo fit from a YAML config."""

import sys
from pathlib import Path

import pytest
import yaml
from dist import dist_env, run_command

CLI = [sys.executable, "-m", "lightning_opt.cli"]
CONSOLE_SCRIPT = Path(sys.executable).parent / "lightning-opt"  # what `pip install` put on PATH
pytestmark = pytest.mark.timeout(400)


def _config(tmp_path: Path, strategy, **trainer) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 2, "strategy": strategy, "max_steps": 6,
            "use_distributed_sampler": False, "enable_progress_bar": False, "enable_model_summary": False,
            "num_sanity_val_steps": 0, "limit_val_batches": 0, "log_every_n_steps": 2,
            "default_root_dir": str(tmp_path), **trainer,
        },
        "model": {"class_path": "scripts._common.TinyModel", "init_args": {"lr": 0.05}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_help_lists_subcommands():
    out = run_command([*CLI, "--help"], timeout=120).stdout
    assert "fit" in out and "validate" in out


def test_fit_help_lists_our_optimizers_and_callbacks():
    out = run_command([*CLI, "fit", "--help"], timeout=120).stdout
    start = out.index("\n  --optimizer CONFIG")  # the option's help, not the usage line
    optimizer_help = out[start:out.index("\n  --lr_scheduler CONFIG", start)]
    for name in ("ACClip", "ClippedSGD", "NormalizedSGD", "StochasticINGD"):
        assert f"lightning_opt.optim.{name}" in optimizer_help, name
    for name in ("GradNormMonitor", "GradientNoiseMonitor", "SharpnessMonitor", "TimeAverageMonitor"):
        assert f"lightning_opt.callbacks.{name}" in out, name


def test_fit_by_registry_name_two_processes(tmp_path):
    cfg = _config(tmp_path, "local_sgd")
    out = run_command([CONSOLE_SCRIPT, "fit", "--config", cfg], timeout=300, env=dist_env()).stdout
    assert "max_steps=6" in out
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts, out[-3000:]
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"


def test_fit_by_class_path_with_init_args_and_print_config_roundtrip(tmp_path):
    strategy = {"class_path": "lightning_opt.strategies.LocalSGDStrategy",
                "init_args": {"period": 3, "outer_lr": 0.7, "outer_momentum": 0.9, "outer_nesterov": True}}
    cfg = _config(tmp_path, strategy)
    printed = run_command([*CLI, "fit", "--config", cfg, "--print_config"], timeout=120).stdout
    parsed = yaml.safe_load(printed)
    assert parsed["trainer"]["strategy"]["class_path"] == "lightning_opt.strategies.LocalSGDStrategy"
    assert parsed["trainer"]["strategy"]["init_args"]["outer_lr"] == 0.7
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    out = run_command([*CLI, "fit", "--config", again], timeout=300, env=dist_env()).stdout
    assert "max_steps=6" in out


@pytest.mark.parametrize("optimizer,args", [
    ("ClippedSGD", ["--optimizer.lr=0.1", "--optimizer.max_norm=1.0", "--optimizer.scope=coordinate"]),
    ("NormalizedSGD", ["--optimizer.lr=0.1", "--optimizer.beta=1.0"]),
    ("ACClip", ["--optimizer.lr=1e-4"]),
    ("StochasticINGD", []),
])
def test_every_optimizer_selectable_from_the_cli(tmp_path, optimizer, args):
    cfg = _config(tmp_path, "auto", devices=1)
    out = run_command([*CLI, "fit", "--config", cfg, "--optimizer", f"lightning_opt.optim.{optimizer}", *args,
                       "--trainer.max_steps=2"], timeout=200, env=dist_env()).stdout
    assert "max_steps=2" in out


@pytest.mark.parametrize("name", ["lsgd", "lookahead", "easgd"])
def test_fit_by_every_other_registry_name(tmp_path, name):
    cfg = _config(tmp_path, name)
    out = run_command([*CLI, "fit", "--config", cfg], timeout=300, env=dist_env()).stdout
    assert "max_steps=6" in out
    assert list(tmp_path.rglob("events.out.tfevents.*"))
