"""No tensor state is shared between ranks, whatever the launcher (issue 17): the structural rule and its unit."""

import inspect
import io
import pickle

import pytest
import torch
from torch.multiprocessing.reductions import init_reductions

import lightning_opt.callbacks as callbacks
import lightning_opt.strategies as strategies
from lightning_opt._ownership import RankLocal, own
from lightning_opt.tensorboard import DashboardCallback


def _public_classes(module):
    return [obj for _, obj in inspect.getmembers(module, inspect.isclass) if obj.__module__.startswith("lightning_opt")]


STATEFUL = [c for c in _public_classes(strategies) + _public_classes(callbacks) + [DashboardCallback]
            if c.__name__ not in ("NonFiniteError",)]


@pytest.mark.parametrize("cls", STATEFUL, ids=lambda c: c.__name__)
def test_every_strategy_callback_and_schedule_is_rank_local(cls):
    assert issubclass(cls, RankLocal)


def _through_torch_multiprocessing(obj):
    """Pickle as torch.multiprocessing does for spawned processes (CPU tensors move to shared memory)."""
    from multiprocessing.reduction import ForkingPickler

    init_reductions()
    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(obj)
    return pickle.loads(buf.getvalue())


def test_lsgd_score_window_is_private_after_transit():
    strategy = strategies.LSGDStrategy(period=2, leader_window=3)
    copy = _through_torch_multiprocessing(strategy)
    assert strategy._window.is_shared()  # what torch.multiprocessing did to the original ...
    assert not copy._window.is_shared()  # ... and what the copy owns
    copy._window[0] = 1.0
    assert torch.isnan(strategy._window[0])


def test_own_walks_containers_and_the_packages_objects_but_not_modules():
    shared = torch.zeros(3).share_memory_()
    layer = torch.nn.Linear(2, 2)
    layer.weight.data.share_memory_()
    sched = strategies.ConstantPeriod(4)
    sched.cache = {"a": [shared, (shared, 1)]}
    state = own({"x": shared, "s": sched, "m": layer})
    assert not state["x"].is_shared() and state["x"] is sched.cache["a"][0] is sched.cache["a"][1][0]
    assert state["m"] is layer and layer.weight.is_shared()  # the model's weights are Lightning's business


def test_generators_travel_as_state():
    monitor = callbacks.GradientNoiseMonitor(every_n_steps=2)
    expected = torch.rand(3, generator=monitor._probe_gen.manual_seed(5))
    monitor._probe_gen.manual_seed(5)
    copy = _through_torch_multiprocessing(monitor)
    assert torch.equal(torch.rand(3, generator=copy._probe_gen), expected)
