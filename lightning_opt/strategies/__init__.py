"""Lightning strategies built on the periodic-synchronisation base (see ``periodic.py``)."""

from lightning_opt.strategies.local_sgd import LocalSGDStrategy
from lightning_opt.strategies.periodic import NonFiniteError, PeriodicSyncStrategy
from lightning_opt.strategies.schedules import ConstantHorizon, ConstantPeriod, PeriodSchedule

STRATEGIES = (LocalSGDStrategy,)

__all__ = [
    "ConstantHorizon",
    "ConstantPeriod",
    "LocalSGDStrategy",
    "NonFiniteError",
    "PeriodSchedule",
    "PeriodicSyncStrategy",
]
