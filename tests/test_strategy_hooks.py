"""The strategies' hooks override a base method (Lightning's ``DDPStrategy`` or our own base), checked at run time.

The hooks carry no ``@override`` decorator: mutmut 3 skips every decorated function, and these hooks hold the
strategies' rules (docs/TESTING.md, "Mutation testing"). What the decorator declared for a type checker is this
table: a hook whose base method is renamed (a Lightning upgrade) or misspelled fails here instead of silently never
being called."""

from __future__ import annotations

import pytest

from lightning_opt.strategies import EASGDStrategy, LocalSGDStrategy, LookaheadStrategy, LSGDStrategy
from lightning_opt.strategies.periodic import PeriodicSyncStrategy

HOOKS = {
    PeriodicSyncStrategy: ("_configure_launcher", "setup_environment", "setup", "configure_ddp", "teardown",
                           "restore_checkpoint_after_setup", "optimizer_step", "on_validation_start",
                           "on_validation_end", "on_train_end", "lightning_module_state_dict", "save_checkpoint",
                           "load_checkpoint", "load_model_state_dict", "load_optimizer_state_dict"),
    LocalSGDStrategy: ("_before_local_step", "_params_changed", "_sync", "_consensus", "_sync_if_due",
                       "on_train_end", "steps_to_next_sync"),
    LookaheadStrategy: ("_sync",),
    LSGDStrategy: ("setup_environment", "_after_inner_step", "_sync", "_consensus"),
    EASGDStrategy: ("_before_local_step", "_params_changed", "_sync", "_consensus"),
}


@pytest.mark.parametrize("cls", list(HOOKS), ids=lambda c: c.__name__)
def test_every_hook_overrides_a_base_method(cls):
    for name in HOOKS[cls]:
        assert name in vars(cls), f"{cls.__name__}.{name} is not defined there"
        bases = [base for base in cls.__mro__[1:] if name in vars(base)]
        assert bases, f"{cls.__name__}.{name} overrides nothing: was the base method renamed?"
