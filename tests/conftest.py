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
