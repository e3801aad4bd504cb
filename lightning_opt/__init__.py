"""lightning-opt: periodic-synchronisation strategies, clipping optimizers and optimisation-dynamics monitors
for PyTorch Lightning.

Works with both Lightning packages (see :mod:`lightning_opt._flavour`): ``lightning_opt.<module>`` is built on
the default package (``$LIGHTNING_OPT_PACKAGE``, else ``pytorch_lightning`` when installed, else ``lightning``),
``lightning_opt.lightning.<module>`` on ``lightning.pytorch`` and ``lightning_opt.pytorch_lightning.<module>`` on
``pytorch_lightning``. Importing the package loads no Lightning package; the strategy names (``local_sgd``,
``lsgd``, ``lookahead``, ``easgd`` and their ``_spawn`` / ``_notebook`` variants) are registered in each Lightning
package's ``StrategyRegistry`` as soon as that package is imported.
"""

from lightning_opt import _flavour

__version__ = "0.1.0"

_flavour.install()

#: every registry name the package registers (in each installed Lightning package)
STRATEGY_NAMES = tuple(n + s for n in _flavour.STRATEGY_CLASSES for s, _ in _flavour._VARIANTS)


def register_strategies(package: str | None = None) -> list[str]:
    """Register the strategy names in the ``StrategyRegistry`` of ``package`` (``"lightning"`` or
    ``"pytorch_lightning"``; default: the default namespace's). Idempotent; happens by itself when the Lightning
    package is imported, so calling it is only needed after a registry was cleared."""
    return _flavour.register(package or _flavour.default_flavour())


__all__ = ["STRATEGY_NAMES", "__version__", "register_strategies"]
