"""The package's size limits (issue 21): no file in ``lightning_opt/`` over 400 lines and no function body over 60
(its docstring not counted: documentation is not what makes a function hard to hold in one's head), unless the
file says why in a ``# shape: <reason>`` comment (on the ``def`` line or the line above it for a function,
anywhere in the first 30 lines for a file).

Usage: python tools/code_shape.py   (from the repository root; exit status 1 when a limit is broken)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lightning_opt"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
MARK = "# shape:"


def _excused(lines: list[str], lineno: int) -> bool:
    """A ``# shape:`` reason on the ``def`` line (1-based ``lineno``) or the line above (decorators included)."""
    return any(MARK in lines[i] for i in range(max(0, lineno - 2), lineno))


def _body_start(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """The first line of the function after its signature and docstring."""
    body = node.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[1].lineno
    return body[0].lineno


def _function_breaks(path: Path, lines: list[str]) -> list[str]:
    out = []
    for node in ast.walk(ast.parse("\n".join(lines), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = node.end_lineno - _body_start(node) + 1
            if length > MAX_FUNCTION_LINES and not _excused(lines, first) and not _excused(lines, node.lineno):
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}() has a {length}-line body")
    return out


def breaks(package: Path = PACKAGE) -> list[str]:
    """Every file and function over its limit without a ``# shape:`` reason."""
    out = []
    for path in sorted(package.rglob("*.py")):
        lines = path.read_text().splitlines()
        if len(lines) > MAX_FILE_LINES and not any(MARK in line for line in lines[:30]):
            out.append(f"{path.relative_to(ROOT)} has {len(lines)} lines")
        out.extend(_function_breaks(path, lines))
    return out


def main() -> int:
    found = breaks()
    print("\n".join(found) if found else f"every file <= {MAX_FILE_LINES} lines, every function <= "
          f"{MAX_FUNCTION_LINES} (or a '{MARK}' reason)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
