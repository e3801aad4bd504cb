"""Count the test suite's ids per layer (docs/TESTING.md): validation rows, in-process unit tests, in-process
multi-rank tests (threads, tests/threaded.py), real multi-process runs (tests/dist.py ``run_ranks``) and other
subprocesses (CLI, scripts, examples, benchmarks, the browser).

Usage: python tools/test_layers.py   (from the repository root; collects with pytest, runs nothing)

A test belongs to the most expensive layer that it, a helper it calls or a fixture it requests (transitively,
within its file) reaches. Static, so a call made only through another module is not seen; the files are small
enough to check by hand.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import Counter
from pathlib import Path

LAYERS = ("validation", "unit", "threaded", "multi-process", "subprocess")
MARKERS = {"run_threaded": "threaded", "run_ranks": "multi-process", "run_python": "subprocess",
           "run_script": "subprocess", "run_quick": "subprocess", "run_command": "subprocess", "Popen": "subprocess",
           "check_output": "subprocess"}
VALIDATION_FILES = {"test_bad_inputs.py", "test_optim_validation.py"}


def _calls(node: ast.AST) -> set[str]:
    names = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            f = sub.func
            names.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
        elif isinstance(sub, ast.Name):
            names.add(sub.id)
    return names


def _layers_of(path: Path) -> dict[str, str]:
    tree = ast.parse(path.read_text())
    funcs = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    memo: dict[str, int] = {}

    def level(name: str, seen: frozenset[str] = frozenset()) -> int:
        if name in memo or name in seen:
            return memo.get(name, 1)
        node = funcs[name]
        reached = _calls(node) | {a.arg for a in node.args.args}
        best = max([LAYERS.index(MARKERS[n]) for n in reached if n in MARKERS] + [1])
        best = max([best] + [level(n, seen | {name}) for n in reached if n in funcs and n != name])
        memo[name] = best
        return best

    if path.name in VALIDATION_FILES:
        return {name: "validation" for name in funcs if name.startswith("test")}
    return {name: LAYERS[level(name)] for name in funcs if name.startswith("test")}


def main() -> None:
    ids = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         capture_output=True, text=True, check=False).stdout.splitlines()
    counts: Counter = Counter()
    layers = {}
    for test_id in (i for i in ids if "::" in i):
        file, name = test_id.split("::")[0], test_id.split("::")[-1].split("[")[0]
        if file not in layers:
            layers[file] = _layers_of(Path(file))
        counts[layers[file].get(name, "unit")] += 1
    print("| layer | test ids |\n|---|---:|")
    for layer in LAYERS:
        print(f"| {layer} | {counts[layer]} |")
    print(f"| **total** | {sum(counts.values())} |")


if __name__ == "__main__":
    main()
