"""Strategy names are registered in both Lightning packages' registries, lazily, idempotently, never shadowing."""

import subprocess
import sys
from pathlib import Path

import pytest

import lightning_opt
from lightning_opt import _flavour


def test_names_registered_with_start_methods(flavour):
    registry = flavour.pl.strategies.StrategyRegistry
    assert registry["local_sgd"]["strategy"].resolve() is flavour.strategies.LocalSGDStrategy
    assert registry["local_sgd"]["init_params"]["start_method"] == "popen"
    assert registry["local_sgd_spawn"]["init_params"]["start_method"] == "spawn"
    assert registry["lsgd_notebook"]["init_params"]["start_method"] == "fork"
    assert set(lightning_opt.STRATEGY_NAMES) <= set(registry.available_strategies())
    assert {"local_sgd", "lsgd", "lookahead", "easgd"} <= set(lightning_opt.STRATEGY_NAMES)


def test_static_names_match_the_classes(flavour):
    assert {cls.strategy_name: cls.__name__ for cls in flavour.strategies.STRATEGIES} == _flavour.STRATEGY_CLASSES


def test_reregistering_is_harmless_and_lightning_names_untouched(flavour):
    registry = flavour.pl.strategies.StrategyRegistry
    before = {name: registry[name]["strategy"] for name in ("ddp", "ddp_spawn", "fsdp", "deepspeed")
              if name in registry}
    lightning_opt.register_strategies(flavour.name)
    lightning_opt.register_strategies(flavour.name)
    assert {name: registry[name]["strategy"] for name in before} == before
    assert all(not n.startswith(("ddp", "fsdp", "deepspeed")) for n in lightning_opt.STRATEGY_NAMES)


# what each name means (README's "Registry names" table), written down independently of the registry's table
NAMED_SETTINGS = {
    "local_sgd": {"period": 8, "warmup_steps": 0},
    "lsgd": {"period": 64, "pull": 0.1, "leader_window": 10},
    "lookahead": {"period": 5, "alpha": 0.5, "mode": "sync"},
    "easgd": {"period": 64, "beta": 0.43},
}


@pytest.mark.parametrize("suffix", ["", "_spawn", "_notebook"])
@pytest.mark.parametrize("name", sorted(NAMED_SETTINGS))
def test_registry_names_carry_their_methods_settings(flavour, name, suffix):
    trainer = flavour.pl.Trainer(accelerator="cpu", devices=1, strategy=name + suffix, logger=False)
    strategy = trainer.strategy
    for key, value in NAMED_SETTINGS[name].items():
        got = strategy.schedule.period if key == "period" else getattr(strategy, key)
        assert got == value, (name, key)


def test_readme_lists_every_registered_name_with_its_settings():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("### Registry names"):]
    table = table[:table.index("\n\n", table.index("| name |"))]
    rows = {line.split("|")[1].strip(" `"): line for line in table.splitlines() if line.startswith("| `")}
    assert set(rows) == set(_flavour.STRATEGY_CLASSES)
    for name, settings in NAMED_SETTINGS.items():
        for key, value in settings.items():
            if key != "warmup_steps":
                assert f"`{key}={value!r}`".replace("'", '"') in rows[name], (name, key)


def test_trainer_resolves_registry_name_single_device(flavour):
    trainer = flavour.pl.Trainer(accelerator="cpu", devices=1, strategy="lsgd", logger=False)
    assert isinstance(trainer.strategy, flavour.strategies.LSGDStrategy)


def test_objects_of_one_package_are_rejected_by_the_other_with_lightnings_error():
    import lightning.pytorch as L
    from lightning_opt.pytorch_lightning.strategies import LocalSGDStrategy

    with pytest.raises(ValueError, match="lightning.pytorch.strategies.Strategy"):
        L.Trainer(accelerator="cpu", devices=1, strategy=LocalSGDStrategy(), logger=False)


def _run(code: str, **env: str) -> str:
    out = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_import_loads_no_lightning_and_registers_on_lightnings_import():
    code = ("import sys, lightning_opt, lightning_opt.optim, lightning_opt.stats; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')));"
            "import lightning.pytorch as L; print('local_sgd' in L.strategies.StrategyRegistry)")
    assert _run(code).split("\n")[:2] == ["[]", "True"]


def test_registration_when_lightning_was_imported_first():
    code = ("import pytorch_lightning as pl, importlib, lightning_opt; importlib.reload(lightning_opt); "
            "print(pl.strategies.StrategyRegistry['easgd_spawn']['strategy'])")
    assert _run(code).strip() == "lightning_opt.pytorch_lightning.strategies.EASGDStrategy"


@pytest.mark.parametrize("chosen", ["lightning", "pytorch_lightning"])
def test_default_namespace_follows_the_environment(chosen):
    code = ("import lightning_opt.strategies as s, lightning_opt.callbacks as c; "
            "base = lambda cls, name: next(b.__module__ for b in cls.__mro__ if b.__name__ == name); "
            "print(base(s.LocalSGDStrategy, 'DDPStrategy'), base(c.GradNormMonitor, 'Callback')); "
            f"import lightning_opt.{chosen}.strategies as n; "
            "print(n is s, n.ConstantHorizon is s.ConstantHorizon, n.NonFiniteError is s.NonFiniteError)")
    out = _run(code, LIGHTNING_OPT_PACKAGE=chosen).split("\n")
    base = _flavour.PACKAGES[chosen]
    assert out[0] == f"{base}.strategies.ddp {base}.callbacks.callback"
    assert out[1] == "True True True"


def test_unknown_package_in_the_environment_is_a_clear_error():
    out = subprocess.run([sys.executable, "-c", "import lightning_opt.strategies"], capture_output=True, text=True,
                         timeout=60, env={**__import__("os").environ, "LIGHTNING_OPT_PACKAGE": "lightnin"})
    assert out.returncode != 0
    assert "LIGHTNING_OPT_PACKAGE='lightnin' is not a Lightning package" in out.stderr
