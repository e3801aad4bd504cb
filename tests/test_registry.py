"""Importing lightning_opt registers its strategy names idempotently and never shadows Lightning's names."""

import importlib
import subprocess
import sys

import pytorch_lightning as pl
from pytorch_lightning.strategies import StrategyRegistry

import lightning_opt
from lightning_opt.strategies import LocalSGDStrategy


def test_names_registered_with_start_methods():
    assert StrategyRegistry["local_sgd"]["strategy"] is LocalSGDStrategy
    assert StrategyRegistry["local_sgd"]["init_params"]["start_method"] == "popen"
    assert StrategyRegistry["local_sgd_spawn"]["init_params"]["start_method"] == "spawn"
    assert set(lightning_opt.STRATEGY_NAMES) >= {"local_sgd", "local_sgd_spawn"}


def test_reimport_is_harmless_and_lightning_names_untouched():
    before = {name: StrategyRegistry[name]["strategy"] for name in ("ddp", "ddp_spawn", "fsdp", "deepspeed")
              if name in StrategyRegistry}
    importlib.reload(lightning_opt)
    importlib.reload(lightning_opt)
    assert {name: StrategyRegistry[name]["strategy"] for name in before} == before
    assert all(not n.startswith(("ddp", "fsdp", "deepspeed")) for n in lightning_opt.STRATEGY_NAMES)


def test_trainer_resolves_registry_name_single_device():
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="local_sgd", logger=False)
    assert isinstance(trainer.strategy, LocalSGDStrategy)


def test_fresh_interpreter_import_twice():
    code = "import lightning_opt, importlib; importlib.reload(lightning_opt); print(lightning_opt.STRATEGY_NAMES)"
    out = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "local_sgd" in out.stdout
