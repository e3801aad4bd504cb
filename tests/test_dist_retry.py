"""The subprocess helper runs a child again on a new port when the free port it picked was taken before the child
bound it (EADDRINUSE, a race between xdist workers), and only then."""

from __future__ import annotations

import os
import sys

import pytest
from dist import run_command

# a child that fails with the message of a taken port while the marker file has fewer than `fails` lines
CHILD = """
import pathlib, sys
marker, fails, message = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
seen = marker.read_text().count("x") if marker.exists() else 0
marker.write_text("x" * (seen + 1))
if seen < fails:
    print(message); sys.exit(1)
print("ran", seen + 1)
"""
TAKEN = "DistNetworkError: ... code: -98, name: EADDRINUSE, message: address already in use"


def _run(tmp_path, fails, message=TAKEN, env=None):
    return run_command([sys.executable, "-c", CHILD, tmp_path / "marker", str(fails), message], timeout=60, env=env)


def test_a_taken_port_is_retried_on_a_new_one(tmp_path):
    assert "ran 3" in _run(tmp_path, 2).stdout


def test_retries_are_bounded_and_other_failures_are_not_retried(tmp_path):
    always = tmp_path / "always"
    always.mkdir()
    with pytest.raises(AssertionError, match="EADDRINUSE"):
        _run(always, 5)
    assert (always / "marker").read_text() == "xxx"  # three attempts
    with pytest.raises(AssertionError, match="boom"):
        _run(tmp_path, 1, "boom")
    assert (tmp_path / "marker").read_text() == "x"


def test_a_callers_own_environment_is_not_retried(tmp_path):
    with pytest.raises(AssertionError, match="EADDRINUSE"):
        _run(tmp_path, 1, env=dict(os.environ))
    assert (tmp_path / "marker").read_text() == "x"
