"""The ``lightning-opt`` command: a ``LightningCLI`` that knows the package's strategies, optimizers and callbacks.

    lightning-opt fit --config examples/configs/quickstart.yaml
    lightning-opt fit --model lightning_opt.examples.ImageClassifier --data lightning_opt.examples.DigitsDataModule \\
        --trainer.strategy=local_sgd --trainer.devices=2 --optimizer lightning_opt.optim.ClippedSGD \\
        --optimizer.lr 0.1 --optimizer.max_norm 1.0

Importing :mod:`lightning_opt` first registers ``local_sgd``, ``lsgd``, ``lookahead`` (and ``*_spawn``), so
``--trainer.strategy=<name>`` resolves; class paths with ``init_args`` work too.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from pytorch_lightning.cli import ArgsType, LightningCLI

import lightning_opt  # noqa: F401  (registers the strategy names before the parser is built)
import lightning_opt.callbacks  # noqa: F401  (imported, so `--help` lists them among the known subclasses)
import lightning_opt.optim  # noqa: F401


class LightningOptCLI(LightningCLI):
    """``LightningCLI`` with subclass mode for model and data (any LightningModule / DataModule by class path)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        # LightningCLI builds `--optimizer` from model.parameters() right after instantiation, before
        # `configure_model` runs. Models whose shape depends on the data (CharTransformerLM(vocab_size=None)) expose
        # `attach_datamodule(dm)` so their layers exist by then.
        attach = getattr(self.model, "attach_datamodule", None)
        if callable(attach) and self.datamodule is not None:
            attach(self.datamodule)
        super()._add_configure_optimizers_method_to_model(subcommand)


def main(args: ArgsType = None) -> None:
    """Console-script entry point (``lightning-opt``)."""
    # Like `python -m`, let class paths name modules in the working directory (e.g. a user's own models).
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    LightningOptCLI(args=args)


if __name__ == "__main__":
    main()
