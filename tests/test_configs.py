"""Every YAML config in examples/configs parses with the CLI (test_launchers.py trains each on 2 processes)."""

import sys
from pathlib import Path

import pytest
import yaml
from dist import dist_env, run_command

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "lightning_opt.cli"]
pytestmark = pytest.mark.timeout(400)


def test_config_round_trips_through_print_config(tmp_path):
    # (every config is parsed and trained on 2 processes by test_launchers.py; printing is checked once here)
    config = ROOT / "examples" / "configs" / "quickstart.yaml"
    printed = run_command([*CLI, "fit", "--config", config, "--print_config"], timeout=120, cwd=ROOT).stdout
    parsed = yaml.safe_load(printed)
    assert parsed["model"]["class_path"] and parsed["trainer"]["strategy"]


def test_charlm_config_builds_vocab_from_the_datamodule(tmp_path):
    cfg = ROOT / "examples" / "configs" / "charlm_acclip.yaml"
    run_command([*CLI, "fit", "--config", cfg, "--trainer.max_steps=3", "--trainer.devices=1",
                 "--trainer.strategy=auto", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=3",
                 f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"],
                timeout=300, env=dist_env(), cwd=ROOT)
    (ckpt,) = list(tmp_path.rglob("*.ckpt"))
    from lightning_opt.examples import CharTransformerLM

    model = CharTransformerLM.load_from_checkpoint(ckpt, map_location="cpu")
    assert model.hparams.vocab_size > 10
