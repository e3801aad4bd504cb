"""Issue 21's limits hold: every file of ``lightning_opt/`` under 400 lines, every function body under 60, or a
``# shape:`` reason where it says why (``tools/code_shape.py``)."""

import importlib.util
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "code_shape.py"


def _tool():
    spec = importlib.util.spec_from_file_location("code_shape", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_file_or_function_of_the_package_breaks_the_size_limits():
    assert _tool().breaks() == []


def test_the_check_sees_a_long_function_and_honours_a_reason(tmp_path):
    tool = _tool()
    body = "\n".join(f"    x{i} = {i}" for i in range(tool.MAX_FUNCTION_LINES + 1))
    (tmp_path / "long.py").write_text(f'def f():\n    """Doc."""\n{body}\n')
    (tmp_path / "excused.py").write_text(f"# shape: one table, read top to bottom\ndef g():\n{body}\n")
    tool.ROOT = tmp_path
    assert [b.split(":")[0] for b in tool.breaks(tmp_path)] == ["long.py"]
