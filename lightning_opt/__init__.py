"""lightning-opt: periodic-synchronisation strategies, clipping optimizers and optimisation-dynamics monitors
for PyTorch Lightning. Importing the package registers its strategy names (``local_sgd``, ``lsgd``,
``lookahead`` and their ``_spawn`` variants) in Lightning's ``StrategyRegistry``."""

from lightning_opt.strategies.registry import register_strategies

__version__ = "0.1.0"

STRATEGY_NAMES = register_strategies()

__all__ = ["STRATEGY_NAMES", "__version__", "register_strategies"]
