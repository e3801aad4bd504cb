"""Lightning strategies built on the periodic-synchronisation base (see ``periodic.py``)."""

from lightning_opt.strategies.curvature_period import CurvatureAdaptivePeriod
from lightning_opt.strategies.easgd import EASGDStrategy
from lightning_opt.strategies.errors import NonFiniteError
from lightning_opt.strategies.local_sgd import LocalSGDStrategy
from lightning_opt.strategies.lookahead import LookaheadStrategy
from lightning_opt.strategies.lsgd import LSGDStrategy
from lightning_opt.strategies.periodic import PeriodicSyncStrategy
from lightning_opt.strategies.schedules import ConstantHorizon, ConstantPeriod, PeriodSchedule

STRATEGIES = (LocalSGDStrategy, LSGDStrategy, LookaheadStrategy, EASGDStrategy)

__all__ = [
    "ConstantHorizon",
    "ConstantPeriod",
    "CurvatureAdaptivePeriod",
    "EASGDStrategy",
    "LocalSGDStrategy",
    "LSGDStrategy",
    "LookaheadStrategy",
    "NonFiniteError",
    "PeriodSchedule",
    "PeriodicSyncStrategy",
]
