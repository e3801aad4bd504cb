"""One implementation for both Lightning packages.

Lightning ships the same trainer under two names, ``pytorch_lightning`` and ``lightning.pytorch`` (``import
lightning as L``). They are distinct classes: a strategy or callback built on one is rejected by the other's
``Trainer``. The package's Lightning-facing modules are written once, against ``pytorch_lightning`` (the *source*
flavour), and an import hook serves them under three names:

* ``lightning_opt.lightning.<module>``: built on ``lightning.pytorch``;
* ``lightning_opt.pytorch_lightning.<module>``: built on ``pytorch_lightning``;
* ``lightning_opt.<module>`` (the default namespace): built on the package named by the environment variable
  ``LIGHTNING_OPT_PACKAGE`` (``lightning`` or ``pytorch_lightning``), else ``pytorch_lightning`` when it is
  installed, else ``lightning``. The flavour namespace equal to the default is the *same* module object.

A module is *Lightning-facing* when it imports ``pytorch_lightning`` or another Lightning-facing module of the
package (read from its import statements); only those are served per flavour, by compiling the same source
file with the package names replaced on the same lines (tracebacks and ``inspect.getsource`` keep pointing at
the real file). Pure modules (``optim``, ``stats``, ``distributed``, schedules, validation, ``NonFiniteError``)
are one module shared by every flavour, so e.g. a ``ConstantHorizon`` works with the strategies of either
namespace.

Strategy names (``local_sgd``, ...) are registered in each Lightning package's ``StrategyRegistry`` when that
package's ``strategies`` module is imported (or at once if it already is), as lazy factories: importing
``lightning_opt`` loads no Lightning package by itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
import warnings
from functools import cache
from pathlib import Path
from typing import Any

ENV = "LIGHTNING_OPT_PACKAGE"
SOURCE = "pytorch_lightning"
#: flavour -> the module that holds its Trainer, strategies, callbacks
PACKAGES = {"pytorch_lightning": "pytorch_lightning", "lightning": "lightning.pytorch"}
#: flavour -> the namespace that serves the package's Lightning-facing modules built on it
NAMESPACES = {"pytorch_lightning": "lightning_opt.pytorch_lightning", "lightning": "lightning_opt.lightning"}
#: top-level parts of the package that may hold Lightning-facing modules
_CANDIDATES = ("strategies", "callbacks", "examples", "tensorboard", "cli")
#: strategy registry names -> class names in ``<namespace>.strategies``
STRATEGY_CLASSES = {"local_sgd": "LocalSGDStrategy", "lsgd": "LSGDStrategy", "lookahead": "LookaheadStrategy",
                    "easgd": "EASGDStrategy"}
#: What a registry name means beyond the class defaults (README's table states them): the class defaults of LSGD
#: (τ = 64, λ = 0.1, a 10-batch window) and Lookahead (k = 5, α = 0.5) are already their papers' settings; Local SGD
#: by name syncs every 8 steps (its class default, period=1, is parameter averaging every step: DDP's bytes), and
#: EASGD by name uses the LSGD paper's EASGD baseline, τ = 64 with β = 0.43.
REGISTRY_DEFAULTS: dict[str, dict[str, Any]] = {"local_sgd": {"period": 8}, "easgd": {"period": 64}}
_ROOT = Path(__file__).resolve().parent
_PL_NAME = re.compile(r"\bpytorch_lightning\b")
_OWN_NAME = re.compile(r"\blightning_opt\.((?:" + "|".join(_CANDIDATES) + r")(?:\.\w+)*)")
_IMPORT = re.compile(r"^\s*(?:from\s+(\S+)\s+import|import\s+(\S+))", re.M)


def installed(flavour: str) -> bool:
    """Whether the Lightning package of ``flavour`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(flavour) is not None
    except (ImportError, ValueError):  # hidden by an import hook, or a broken entry in sys.modules
        return False


def default_flavour() -> str:
    """The flavour of the default namespace: ``$LIGHTNING_OPT_PACKAGE``, else ``pytorch_lightning`` when it is
    installed, else ``lightning``."""
    chosen = os.environ.get(ENV, "").strip()
    if chosen:
        if chosen not in PACKAGES:
            raise ValueError(f"{ENV}={chosen!r} is not a Lightning package; expected one of {sorted(PACKAGES)}")
        return chosen
    for flavour in ("pytorch_lightning", "lightning"):
        if installed(flavour):
            return flavour
    raise ModuleNotFoundError("lightning-opt needs Lightning: pip install 'lightning-opt[lightning]' (or "
                              "'lightning-opt[pytorch-lightning]')")


def lightning_module(flavour: str | None = None) -> Any:
    """The Lightning package (``pytorch_lightning`` or ``lightning.pytorch``) of ``flavour`` (default: the
    default namespace's), e.g. ``pl = lightning_module(); pl.Trainer(...)``."""
    return importlib.import_module(PACKAGES[flavour or default_flavour()])


def namespace(flavour: str | None = None) -> str:
    """The module prefix serving ``flavour`` (``lightning_opt`` for the default flavour)."""
    flavour = flavour or default_flavour()
    return "lightning_opt" if flavour == default_flavour() else NAMESPACES[flavour]


# ----------------------------------------------------------------------------------------- which modules
def _source_file(rel: str) -> Path | None:
    """The file that defines ``lightning_opt.<rel>`` (a module or a package's ``__init__``), if any."""
    base = _ROOT.joinpath(*rel.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _module_of(rel: str) -> str | None:
    """The longest prefix of the dotted name ``rel`` that is a module of the package (``strategies.X`` where X
    is a class resolves to ``strategies``)."""
    parts = rel.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if _source_file(candidate) is not None:
            return candidate
    return None


@cache
def lightning_facing(rel: str, _seen: frozenset[str] = frozenset()) -> bool:
    """Whether ``lightning_opt.<rel>`` must be built per flavour (see the module docstring)."""
    path = _source_file(rel)
    if path is None or rel in _seen:
        return False
    imported = [a or b for a, b in _IMPORT.findall(path.read_text(encoding="utf-8"))]  # docstrings don't count
    if any(_PL_NAME.match(name) for name in imported):
        return True
    own = {_module_of(m.group(1)) for name in imported if (m := _OWN_NAME.match(name))} - {None}
    return any(lightning_facing(mod, _seen | {rel}) for mod in own)


def rewrite(text: str, flavour: str, prefix: str) -> str:
    """``text`` (a source file written against ``pytorch_lightning``) built on ``flavour``, with the package's
    Lightning-facing modules imported from ``prefix`` (line count unchanged)."""

    def own(match: re.Match[str]) -> str:
        mod = _module_of(match.group(1))
        return f"{prefix}.{match.group(1)}" if mod is not None and lightning_facing(mod) else match.group(0)

    return _OWN_NAME.sub(own, _PL_NAME.sub(PACKAGES[flavour], text))


# ----------------------------------------------------------------------------------------- the import hook
class _RewritingLoader(importlib.machinery.SourceFileLoader):
    """Compiles the source file with :func:`rewrite` applied; never reads or writes bytecode caches (the cache
    of the file belongs to its source-flavour module)."""

    def __init__(self, fullname: str, path: str, flavour: str, prefix: str) -> None:
        super().__init__(fullname, path)
        self.flavour, self.prefix = flavour, prefix

    def get_code(self, fullname: str) -> Any:
        path = self.get_filename(fullname)
        text = rewrite(Path(path).read_text(encoding="utf-8"), self.flavour, self.prefix)
        return compile(text, path, "exec", dont_inherit=True)


class _AliasLoader(importlib.abc.Loader):
    """Makes ``fullname`` the already-importable module ``target`` (one module object under two names)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: Any) -> None:
        # The import system returns whatever sys.modules holds for the name after exec_module.
        sys.modules[module.__name__] = importlib.import_module(self.target)


class _Finder(importlib.abc.MetaPathFinder):
    """Serves ``lightning_opt[.<flavour namespace>].<Lightning-facing module>`` (see the module docstring) and
    registers the strategy names when a Lightning package's ``strategies`` module is loaded."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname in _REGISTRY_MODULES:
            return _registering_spec(fullname, path)
        ns, rel = _split(fullname)
        if rel is None or rel.split(".")[0] not in _CANDIDATES:
            return None
        file = _source_file(rel)
        if file is None:
            return None
        default = default_flavour()
        flavour = default if ns == "lightning_opt" else _FLAVOUR_OF[ns]
        if ns == "lightning_opt":
            if flavour == SOURCE or not lightning_facing(rel):
                return None  # the ordinary import
            loader: Any = _RewritingLoader(fullname, str(file), flavour, "lightning_opt")
        elif flavour == default or not lightning_facing(rel):
            loader = _AliasLoader(f"lightning_opt.{rel}")
        else:
            loader = _RewritingLoader(fullname, str(file), flavour, ns)
        is_pkg = file.name == "__init__.py"
        return importlib.util.spec_from_file_location(
            fullname, file, loader=loader, submodule_search_locations=[str(file.parent)] if is_pkg else None)


_FLAVOUR_OF = {ns: flavour for flavour, ns in NAMESPACES.items()}


def _split(fullname: str) -> tuple[str, str | None]:
    for ns in NAMESPACES.values():
        if fullname.startswith(ns + "."):
            return ns, fullname[len(ns) + 1:]
    if fullname.startswith("lightning_opt."):
        return "lightning_opt", fullname[len("lightning_opt."):]
    return "", None


# ----------------------------------------------------------------------------------------- strategy names
_REGISTRY_MODULES = {f"{pkg}.strategies": flavour for flavour, pkg in PACKAGES.items()}
#: registry-name suffix -> start method (``_notebook``: fork, for Jupyter, like Lightning's ``ddp_notebook``)
_VARIANTS = (("", "popen"), ("_spawn", "spawn"), ("_notebook", "fork"))


class LazyStrategy:
    """A ``StrategyRegistry`` entry: builds ``<namespace>.strategies.<class_name>`` when the Trainer asks for it,
    so registering a name imports none of the package's strategies."""

    def __init__(self, flavour: str, class_name: str) -> None:
        self.flavour, self.class_name = flavour, class_name

    def resolve(self) -> type:
        return getattr(importlib.import_module(NAMESPACES[self.flavour] + ".strategies"), self.class_name)

    def __call__(self, **init_params: Any) -> Any:
        return self.resolve()(**init_params)

    def __repr__(self) -> str:
        return f"{NAMESPACES[self.flavour]}.strategies.{self.class_name}"


def register(flavour: str) -> list[str]:
    """Register ``<name>`` (start_method ``popen``), ``<name>_spawn`` and ``<name>_notebook`` (fork) for every
    strategy in the ``StrategyRegistry`` of ``flavour``'s package; idempotent, and a name someone else
    registered is left alone with a warning. Returns the names this package owns there."""
    registry = importlib.import_module(PACKAGES[flavour] + ".strategies").StrategyRegistry
    owned = []
    for base, class_name in STRATEGY_CLASSES.items():
        for suffix, start_method in _VARIANTS:
            name = base + suffix
            if name in registry:
                if repr(registry[name]["strategy"]) != f"{NAMESPACES[flavour]}.strategies.{class_name}":
                    warnings.warn(f"strategy name {name!r} is already registered; lightning_opt leaves it alone",
                                  stacklevel=2)
                    continue
            else:
                defaults = REGISTRY_DEFAULTS.get(base, {})
                settings = "".join(f", {k}={v!r}" for k, v in defaults.items())
                registry.register(name, LazyStrategy(flavour, class_name),
                                  description=f"{class_name} (lightning-opt){settings}, start_method={start_method!r}",
                                  start_method=start_method, **defaults)
            owned.append(name)
    return owned


class _RegisteringLoader(importlib.abc.Loader):
    """Runs a Lightning package's ``strategies`` module, then registers the package's names in its registry."""

    def __init__(self, inner: Any, flavour: str) -> None:
        self.inner, self.flavour = inner, flavour

    def create_module(self, spec: Any) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.inner.exec_module(module)
        sys.modules[module.__name__] = module  # `register` imports it by name
        register(self.flavour)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _registering_spec(fullname: str, path: Any) -> Any:
    spec = importlib.machinery.PathFinder.find_spec(fullname, path)
    if spec is not None and spec.loader is not None:
        spec.loader = _RegisteringLoader(spec.loader, _REGISTRY_MODULES[fullname])
    return spec


def install() -> None:
    """Put the hook first on ``sys.meta_path`` (idempotent) and register the names in every Lightning package
    whose strategies are already imported."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for module, flavour in _REGISTRY_MODULES.items():
        if module in sys.modules:
            register(flavour)
