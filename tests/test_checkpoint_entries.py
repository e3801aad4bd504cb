"""The rank-local checkpoint entries (``strategies/_checkpoint.py``) by value, in process and without Lightning:
what a save copies, what a load hands back, and what a damaged or foreign file is told. The end-to-end resume
runs (gloo, subprocess) are in test_checkpoint*.py and test_auto_resume.py; these are the fast checks
``make mutate`` runs on the same code."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn

from lightning_opt.strategies._checkpoint import (
    SavedRun,
    declared_state,
    gather_ranks,
    load_declared_state,
    saved_run,
    to_cpu,
    to_device,
)

META = torch.device("meta")


def test_to_cpu_copies_only_when_asked_and_keeps_container_types():
    t = torch.arange(3.0, requires_grad=True)
    shared, copied = to_cpu({"a": [t, (t, 5)]}), to_cpu({"a": [t, (t, 5)]}, copy=True)
    assert isinstance(shared["a"], list) and isinstance(shared["a"][1], tuple) and shared["a"][1][1] == 5
    assert shared["a"][0].data_ptr() == t.data_ptr() and shared["a"][1][0].data_ptr() == t.data_ptr()
    for c in (copied["a"][0], copied["a"][1][0]):  # a copy at every depth
        assert c.data_ptr() != t.data_ptr() and torch.equal(c, t.detach())
    assert not shared["a"][0].requires_grad  # detached
    assert to_cpu("text") == "text"


def test_to_device_moves_every_nested_tensor():
    moved = to_device({"a": [torch.ones(2), (torch.zeros(1), "x")], "b": 3}, META)
    assert moved["a"][0].device == META and moved["a"][1][0].device == META
    assert isinstance(moved["a"][1], tuple) and moved["a"][1][1] == "x" and moved["b"] == 3


class Owner:
    def __init__(self) -> None:
        self.anchor = {0: [torch.ones(2)]}
        self.count = 4


def test_declared_state_is_a_copy_and_load_sets_only_what_the_file_holds():
    owner = Owner()
    state = declared_state(owner, {"anchor": "anchor", "n": "count"})
    owner.anchor[0][0].add_(1.0)  # training goes on after a save
    assert torch.equal(state["anchor"][0][0], torch.ones(2)) and state["n"] == 4
    other = Owner()
    other.count = 9
    load_declared_state(other, {"anchor": "anchor", "n": "count"}, {"anchor": state["anchor"]}, META)
    assert other.anchor[0][0].device == META and other.count == 9  # "n" not in the file: kept


def test_gather_ranks_on_one_process_copies_this_ranks_entry():
    module = nn.BatchNorm1d(2)
    checkpoint = {"optimizer_states": [{"state": {0: torch.ones(1)}}], "callbacks": {"cb": {"x": torch.ones(1)}}}
    (entry,) = gather_ranks(module, checkpoint, {"window": torch.zeros(2)})
    assert set(entry) == {"module", "optimizer_states", "strategy_local", "callbacks"}
    assert set(entry["module"]) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    with torch.no_grad():
        module.weight.add_(1.0)
    assert torch.equal(entry["module"]["weight"], torch.ones(2))  # a copy, not the live parameter
    assert torch.equal(entry["callbacks"]["cb"]["x"], torch.ones(1))
    assert torch.equal(entry["strategy_local"]["window"], torch.zeros(2))
    assert torch.equal(entry["optimizer_states"][0]["state"][0], torch.ones(1))


def _warned(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, caught


def test_entry_for_same_world_is_the_ranks_own_else_none_with_a_warning():
    run = SavedRun(2, {"x": 1}, [{"r": 0}, {"r": 1}])
    assert run.entry_for(1, 2) == {"r": 1}
    entry, caught = _warned(lambda: run.entry_for(0, 3))
    assert entry is None and len(caught) == 1
    assert str(caught[0].message) == ("checkpoint was written with world size 2, resuming with 3: every rank "
                                      "restarts from the consensus weights and rank 0's optimizer state")
    assert _warned(lambda: run.entry_for(0, 3, warn=False)) == (None, [])


NAMES = {f"w{i}" for i in range(6)}


def _table(bad: int, n: int = 6) -> dict:
    return {f"w{i}": torch.tensor([float("nan") if i < bad else 1.0]) for i in range(n)}


def _load(checkpoint, name="local_sgd", names=NAMES):
    """As the strategy calls it: ``saved_run`` one frame below the loader (its warnings point at the loader's
    caller, stacklevel 3)."""
    return saved_run(checkpoint, "ck.ckpt", names, name, "LocalSGDStrategy(period=4)")


@pytest.mark.parametrize("bad,listed", [(1, "w0"), (4, "w0, w1, w2, w3"), (5, "w0, w1, w2, w3, ...")])
def test_non_finite_saved_weights_are_refused_naming_up_to_four(bad, listed):
    with pytest.raises(ValueError) as info:
        _load({"state_dict": _table(bad)})
    assert str(info.value) == (f"ck.ckpt: non-finite values in the saved weights ({listed}); the file is "
                               "damaged, refusing to resume from it")


def test_a_damaged_rank_entry_is_refused_naming_the_rank():
    ranks = [{"module": _table(0)}, {"module": _table(2)}]
    with pytest.raises(ValueError, match=r"non-finite values in rank 1's weights \(w0, w1\)"):
        _load({"state_dict": _table(0), "lightning_opt": {"world_size": 2, "strategy": {}, "ranks": ranks}})


def test_only_floating_parameters_are_judged():
    table = {"w0": torch.tensor([1.0]), "buf": torch.tensor([float("nan")]),  # not a parameter name
             "w1": torch.tensor([7]), "w2": "text"}
    ranks = [None, {"module": None}, {"module": {"w3": torch.tensor([float("inf")])}}]
    with pytest.raises(ValueError, match=r"rank 2's weights \(w3\)"):  # the malformed entries are skipped
        _load({"state_dict": table, "lightning_opt": {"world_size": 3, "strategy": {}, "ranks": ranks}})
    assert _warned(lambda: _load({"state_dict": table}))[0] is None


def test_a_file_without_our_entry_warns_that_everything_but_the_weights_starts_afresh():
    run, caught = _warned(lambda: _load({"state_dict": _table(0)}))
    assert run is None and len(caught) == 1
    assert str(caught[0].message) == (
        "ck.ckpt has no lightning_opt entry (written by another strategy, e.g. plain DDP): every rank starts from "
        "the saved weights, and the sync schedule, counters and outer state start afresh")


def _entry(name=None, extra=None, strategy_repr=None):
    entry = {"world_size": 2, "strategy": {"steps": {0: 3}, "extra": extra or {}}, "ranks": [{}, {}]}
    if name is not None:
        entry["strategy_name"] = name
    if strategy_repr is not None:
        entry["strategy_repr"] = strategy_repr
    return {"state_dict": {}, "lightning_opt": entry}


def test_our_own_file_keeps_its_strategy_state():
    for name in (None, "local_sgd"):  # files from before strategy_name was saved are taken as ours
        run, caught = _warned(lambda n=name: _load(_entry(n)))
        assert caught == [] and run.world_size == 2 and run.strategy == {"steps": {0: 3}, "extra": {}}


@pytest.mark.parametrize("extra,dropped", [({"center": {0: [torch.ones(1)]}, "anchor": {}, "last": 2},
                                            "center, last"),
                                           ({"anchor": {}, "momentum": [], "stream": {}}, "none")])
def test_another_strategys_file_drops_its_state_naming_only_what_it_used(extra, dropped):
    run, caught = _warned(lambda: _load(_entry("easgd", extra, "EASGDStrategy(period=3)")))
    assert run.strategy is None and run.ranks == [{}, {}] and len(caught) == 1
    assert str(caught[0].message) == (
        "ck.ckpt was written under EASGDStrategy(period=3); resuming under LocalSGDStrategy(period=4): its strategy "
        f"state is dropped (sync counters, schedule, extra state: {dropped}) and the schedule starts afresh; every "
        "rank's weights and optimizer state are reused")
    _, caught = _warned(lambda: _load(_entry("easgd")))
    assert "written under easgd;" in str(caught[0].message)  # no repr saved: the name


def _line() -> int:
    """The caller's line: a warning with the right stacklevel points at it."""
    return inspect.currentframe().f_back.f_lineno


@pytest.mark.warning_location
def test_the_warnings_point_at_the_loaders_caller():
    """``entry_for`` warns at its caller (stacklevel 2), ``saved_run`` at its caller's caller (3: the strategy's
    ``load_checkpoint`` calls it on behalf of Lightning's loader)."""
    run = SavedRun(2, None, [{}, {}])
    found = [(_warned(lambda: run.entry_for(0, 3))[1], _line()),
             (_warned(lambda: _load({"state_dict": {}}))[1], _line()),
             (_warned(lambda: _load(_entry("easgd")))[1], _line())]
    for caught, line in found:
        assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)]
