"""Run the ``lightning-opt`` CLI as if one Lightning package were not installed.

Usage: hidden_package.py HIDE [CLI ARGS ...]    (HIDE: lightning | pytorch_lightning)
An import hook makes ``HIDE`` and its submodules unimportable, as in an environment without it, then the CLI runs;
the script prints which package the Trainer came from.
"""

import importlib.abc
import sys


class Hide(importlib.abc.MetaPathFinder):
    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


hide, args = sys.argv[1], sys.argv[2:]
sys.meta_path.insert(0, Hide(hide))

from lightning_opt import _flavour  # noqa: E402
from lightning_opt.cli import LightningOptCLI  # noqa: E402

cli = LightningOptCLI(args=args)
print("DEFAULT", _flavour.default_flavour(), "TRAINER", type(cli.trainer).__module__, "STEPS", cli.trainer.global_step)
assert hide not in {m.split(".")[0] for m in sys.modules}, "the hidden package was imported"
