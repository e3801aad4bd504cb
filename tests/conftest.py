import os

import pytest

# Keep the 2-core machine responsive when several ranks run at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def out_dir(tmp_path):
    """A per-test directory that distributed scripts write their per-rank results into."""
    d = tmp_path / "out"
    d.mkdir()
    return d


class Flavour:
    """One Lightning package and the lightning-opt namespace built on it (see ``lightning_opt/_flavour.py``)."""

    def __init__(self, name: str) -> None:
        import importlib

        from lightning_opt import _flavour

        self.name = name
        self.namespace = _flavour.NAMESPACES[name]
        self.pl = importlib.import_module(_flavour.PACKAGES[name])
        self.strategies = importlib.import_module(self.namespace + ".strategies")
        self.callbacks = importlib.import_module(self.namespace + ".callbacks")

    def __repr__(self) -> str:
        return self.name


@pytest.fixture(params=["pytorch_lightning", "lightning"])
def flavour(request) -> Flavour:
    """Run the test once per Lightning package (``pytorch_lightning`` and ``lightning.pytorch``)."""
    return Flavour(request.param)


# Files measured slowest under two workers (`--durations=0`, 2026-12-04): collected first so that `make test`'s
# workers (pytest-xdist, whole files each) start them early instead of ending the run on one of them.
_SLOW_FIRST = ("test_launchers.py", "test_reliability.py", "test_reproductions_a.py", "test_arch_zoo.py",
               "test_cli.py", "test_registry.py", "test_reproductions_b.py", "test_sharpness_monitor.py",
               "test_bench_smoke.py", "test_nonfinite.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
