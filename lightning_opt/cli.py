"""The ``lightning-opt`` command: a ``LightningCLI`` that knows the package's strategies, optimizers and callbacks.

    lightning-opt fit --config examples/configs/quickstart.yaml
    lightning-opt fit --model lightning_opt.examples.ImageClassifier --data lightning_opt.examples.DigitsDataModule \\
        --trainer.strategy=local_sgd --trainer.devices=2 --optimizer lightning_opt.optim.ClippedSGD \\
        --optimizer.lr 0.1 --optimizer.max_norm 1.0

Importing :mod:`lightning_opt` first registers ``local_sgd``, ``lsgd``, ``lookahead`` (and ``*_spawn``), so
``--trainer.strategy=<name>`` resolves; class paths with ``init_args`` work too.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import traceback
from typing import Any

import fsspec
from pytorch_lightning.cli import ArgsType, LightningCLI, SaveConfigCallback

import lightning_opt  # noqa: F401  (registers the strategy names before the parser is built)
import lightning_opt.callbacks  # noqa: F401  (imported, so `--help` lists them among the known subclasses)
import lightning_opt.optim  # noqa: F401
from lightning_opt import STRATEGY_NAMES
from lightning_opt._flavour import STRATEGY_CLASSES


class KeepEachRunsConfig(SaveConfigCallback):
    """Writes the run's config into its log directory without ever replacing an earlier run's: where that
    directory already holds ``config.yaml`` (``logger: false``, a fixed logger version), this run's is
    ``config_1.yaml``, ``config_2.yaml``, ... so each config still matches the checkpoints written beside it."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir:
            log_dir = trainer.log_dir  # a collective: every rank asks
            name = None
            if trainer.is_global_zero and log_dir is not None:
                fs = fsspec.core.url_to_fs(str(log_dir))[0]  # local or remote, as Lightning's own check
                stem, dot, ext = self.config_filename.rpartition(".")
                name, n = self.config_filename, 0
                while fs.isfile(os.path.join(log_dir, name)):
                    n += 1
                    name = f"{stem}_{n}{dot}{ext}" if dot else f"{self.config_filename}_{n}"
            self.config_filename = trainer.strategy.broadcast(name) or self.config_filename
        super().setup(trainer, pl_module, stage)


class LightningOptCLI(LightningCLI):
    """``LightningCLI`` with subclass mode for model and data (any LightningModule / DataModule by class path)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", KeepEachRunsConfig)
        super().__init__(*args, **kwargs)

    def instantiate_classes(self) -> None:
        # A bad value anywhere (strategy, trainer, model, data, callbacks, optimizer) ends here as one short
        # `error:` block naming the argument, exit code 2, before any process is launched.
        try:
            super().instantiate_classes()
            self._check_optimizer_arguments()
        except (ValueError, TypeError) as err:
            if os.environ.get("LIGHTNING_OPT_TRACEBACK") == "1":  # debugging one's own classes: the full story
                raise
            self.parser.error(user_message(err))

    def _check_optimizer_arguments(self) -> None:
        """Build the configured optimizer once on a stand-in parameter: its argument checks run now, not in
        ``configure_optimizers`` on every rank after launch."""
        import torch
        from pytorch_lightning.cli import instantiate_class

        cfg = self.config_init.get(self.subcommand, self.config_init).get("optimizer")
        if cfg is not None and not isinstance(cfg, torch.optim.Optimizer):
            instantiate_class([torch.nn.Parameter(torch.zeros(1))], cfg)

    def _parse_ckpt_path(self) -> None:
        # Lightning copies the checkpoint's recorded model class into the config and imports it: a checkpoint
        # would decide what code runs. Only a class the config or command line named may be imported.
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and os.path.isfile(ckpt_path):
            recorded = _recorded_class(ckpt_path)
            configured = self.config[sub].get("model")
            configured = configured.get("class_path") if hasattr(configured, "get") else None
            if recorded is not None and _same_class(recorded, configured) is False:
                self.parser.error(f"--ckpt_path {ckpt_path} holds a model of class {recorded}, but the config names "
                                  f"{configured or 'no model class'}; name the checkpoint's class with --model to "
                                  "resume it (nothing the checkpoint names was imported)")
        super()._parse_ckpt_path()

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        # LightningCLI builds `--optimizer` from model.parameters() right after instantiation, before
        # `configure_model` runs. Models whose shape depends on the data (CharTransformerLM(vocab_size=None)) expose
        # `attach_datamodule(dm)` so their layers exist by then.
        attach = getattr(self.model, "attach_datamodule", None)
        if callable(attach) and self.datamodule is not None:
            attach(self.datamodule)
        super()._add_configure_optimizers_method_to_model(subcommand)


def user_message(err: BaseException) -> str:
    """The message a person needs from an error raised while the CLI built its objects: the innermost error not
    raised by jsonargparse (whose wrappers read "Expected a <class 'str'>. Got value: Namespace(...)"), or, for a
    union like ``strategy: str | Strategy``, the one line of its report that is not a type mismatch."""
    chain, seen = [], set()
    stack: list[BaseException | None] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        chain.append(e)
        stack += [e.__context__, e.__cause__]
    for e in reversed(chain):
        frames = traceback.extract_tb(e.__traceback__)
        if frames and "jsonargparse" not in frames[-1].filename:
            return _with_suggestion(str(e))
    for line in str(err).splitlines():
        line = line.strip()
        if line.startswith("- ") and not line.startswith("- Expected a") and "Namespace(" not in line:
            return line[2:]
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _with_suggestion(message: str) -> str:
    match = re.search(r"invalid strategy name: `strategy='([^']*)'`", message)
    if match:
        close = difflib.get_close_matches(match.group(1), STRATEGY_NAMES, n=1)
        head = message.split(". It must be")[0]
        hint = f"; did you mean {close[0]!r}?" if close else ""
        names = ", ".join(STRATEGY_CLASSES)
        return f"{head}{hint} (lightning-opt registers {names}, each also as <name>_spawn and <name>_notebook)"
    return message


def _recorded_class(ckpt_path: str) -> str | None:
    """The model class path a LightningCLI checkpoint recorded (``hyper_parameters._class_path``), read with
    torch's safe loader; None if there is none or the file cannot be read (Lightning then reports it)."""
    import torch

    try:
        hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters") or {}
    except Exception:
        return None
    recorded = hparams.get("_class_path")
    return recorded if isinstance(recorded, str) else None


def _same_class(recorded: str, configured: str | None) -> bool:
    """Class paths naming the same class: equal once the flavour namespace is dropped
    (``lightning_opt.lightning.examples.X`` is ``lightning_opt.examples.X``) and ``pkg.X`` matches ``pkg.mod.X``
    re-exported from ``pkg``, by class name and top package."""
    if configured is None:
        return False

    def plain(path: str) -> list[str]:
        for ns in ("lightning_opt.lightning.", "lightning_opt.pytorch_lightning."):
            if path.startswith(ns):
                path = "lightning_opt." + path[len(ns):]
        return path.split(".")

    a, b = plain(recorded), plain(configured)
    return a == b or (a[-1] == b[-1] and a[0] == b[0] and (a[:-1] == b[:len(a) - 1] or b[:-1] == a[:len(b) - 1]))


def working_directory_last() -> None:
    """Let class paths name modules in the working directory (a user's own models), *after* every installed
    package: a stray ``sklearn.py`` where the command runs must never replace scikit-learn. ``python -m`` puts the
    working directory first; it is moved to the end too."""
    cwd = os.getcwd()
    sys.path[:] = [p for p in sys.path if p not in ("", cwd)] + [cwd]


def main(args: ArgsType = None) -> None:
    """Console-script entry point (``lightning-opt``)."""
    working_directory_last()
    LightningOptCLI(args=args)


if __name__ == "__main__":
    main()
