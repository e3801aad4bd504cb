"""Every YAML config in examples/configs parses with the CLI (test_launchers.py trains each on 2 processes)."""

import sys
from pathlib import Path

import pytest
import torch
import yaml
from dist import dist_env, run_command, run_python

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "lightning_opt.cli"]
CONSOLE = Path(sys.executable).parent / "lightning-opt"  # what `pip install` put on PATH
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


SHADOW = '''from pathlib import Path
Path(__file__).with_name("SHADOWED").write_text("the working directory's sklearn.py ran")
raise ImportError("shadowed")
'''
USER_MODEL = '''from lightning_opt.examples import ImageClassifier


class MyClassifier(ImageClassifier):
    """A user's own model, importable by class path from the working directory."""
'''


def test_working_directory_never_shadows_an_installed_package(tmp_path):
    (tmp_path / "sklearn.py").write_text(SHADOW)  # the digits data module imports scikit-learn
    (tmp_path / "my_models.py").write_text(USER_MODEL)
    cfg = ROOT / "examples" / "configs" / "quickstart.yaml"
    run_command([CONSOLE, "fit", "--config", cfg, "--model", "my_models.MyClassifier", "--trainer.max_steps=1",
                 "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.limit_val_batches=0",
                 "--trainer.callbacks=[]", f"--trainer.default_root_dir={tmp_path / 'runs'}",
                 "--trainer.enable_progress_bar=false"], timeout=300, env=dist_env(), cwd=tmp_path)
    assert not (tmp_path / "SHADOWED").exists()
    assert list((tmp_path / "runs").rglob("*.ckpt"))  # and the user's model from the working directory trained


def test_a_second_run_into_the_same_directory_keeps_the_first_runs_config(tmp_path):
    cfg = ROOT / "examples" / "configs" / "quickstart.yaml"
    for steps in (1, 2):
        run_command([*CLI, "fit", "--config", cfg, f"--trainer.max_steps={steps}", "--trainer.devices=1",
                     "--trainer.strategy=auto", "--trainer.limit_val_batches=0", "--trainer.callbacks=[]",
                     "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
                     "--trainer.enable_progress_bar=false"], timeout=300, env=dist_env(), cwd=ROOT)
    first, second = (yaml.safe_load((tmp_path / name).read_text()) for name in ("config.yaml", "config_1.yaml"))
    assert (first["trainer"]["max_steps"], second["trainer"]["max_steps"]) == (1, 2)


EVIL = '''from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text("a module named only by the checkpoint ran")
from lightning_opt.examples import ImageClassifier as Model
'''


def test_a_checkpoint_never_decides_what_the_cli_imports(tmp_path):
    cfg = ROOT / "examples" / "configs" / "quickstart.yaml"
    base = [CONSOLE, "fit", "--config", cfg, "--trainer.devices=1", "--trainer.strategy=auto",
            "--trainer.limit_val_batches=0", "--trainer.callbacks=[]", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"]
    run_command([*base, "--trainer.max_steps=1"], timeout=300, env=dist_env(), cwd=tmp_path)
    (ckpt,) = list(tmp_path.rglob("*.ckpt"))
    evil = torch.load(ckpt, weights_only=False)
    evil["hyper_parameters"]["_class_path"] = "evil_module.Model"
    torch.save(evil, tmp_path / "evil.ckpt")
    (tmp_path / "evil_module.py").write_text(EVIL)
    proc = run_python([*base, "--trainer.max_steps=2", f"--ckpt_path={tmp_path / 'evil.ckpt'}"], timeout=300,
                      cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "holds a model of class evil_module.Model, but the config names lightning_opt.examples." in proc.stderr
    assert not (tmp_path / "IMPORTED").exists()
    # the checkpoint of the configured class resumes as before
    run_command([*base, "--trainer.max_steps=2", f"--ckpt_path={ckpt}"], timeout=300, env=dist_env(), cwd=tmp_path)
