"""Registers the package's strategies in Lightning's ``StrategyRegistry`` (idempotent, never shadows a name)."""

from __future__ import annotations

import warnings

from pytorch_lightning.strategies import StrategyRegistry


def register_strategies() -> list[str]:
    """Register ``<name>`` (start_method ``popen``) and ``<name>_spawn`` for every strategy of the package.

    Safe to call repeatedly. A name Lightning (or someone else) already registered for another class is left alone
    with a warning rather than overridden. Returns the names this package owns in the registry.
    """
    from lightning_opt.strategies import STRATEGIES

    owned = []
    for cls in STRATEGIES:
        for suffix, start_method in (("", "popen"), ("_spawn", "spawn")):
            name = cls.strategy_name + suffix
            if name in StrategyRegistry:
                if _qualname(StrategyRegistry[name]["strategy"]) != _qualname(cls):
                    warnings.warn(f"strategy name {name!r} is already registered; lightning_opt leaves it alone",
                                  stacklevel=2)
                    continue
            else:
                StrategyRegistry.register(
                    name, cls, description=f"{cls.__name__} (lightning-opt), start_method={start_method!r}",
                    start_method=start_method,
                )
            owned.append(name)
    return owned


def _qualname(cls: type) -> str:
    # Compared by name, not identity, so re-importing (e.g. importlib.reload) stays harmless.
    return f"{cls.__module__}.{cls.__qualname__}"
