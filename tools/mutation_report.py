"""Summarise a `mutmut run` (the `mutants/` folder): killed / survived / not reached, per module and per package.

Usage: python tools/mutation_report.py [--survivors | --kinds]   (from the repository root after `make mutate`)

``--survivors`` lists the surviving mutants with their changed line; ``--kinds`` counts them by what they change
(message or key text, logging and byte accounting, dtype/device arguments, the rest).

mutmut 3 records each mutant's exit code in ``mutants/<path>.meta``; its own table (``status_by_exit_code``) says
what a code means. "no tests": no selected test reached the mutated function. Only the in-process tests are
selected (pyproject ``[tool.mutmut]``), so that is code checked only by the multi-process and subprocess tests, or
not at all.
"""

from __future__ import annotations

import ast
import difflib
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from mutmut.stats import status_by_exit_code

ROOT = Path("mutants")


def collect() -> dict[str, dict[str, str]]:
    """{module path: {mutant name: status}}"""
    out: dict[str, dict[str, str]] = {}
    for meta in sorted(ROOT.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        out[str(meta.relative_to(ROOT))[: -len(".meta")]] = {k: status_by_exit_code[v] for k, v in codes.items()}
    return out


def _functions(path: str) -> dict[str, str]:
    """Source of every function in a mutated file, by name (mutants and the ``__mutmut_orig`` copies)."""
    source = (ROOT / path).read_text()
    lines = source.splitlines()
    nodes = [n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return {n.name: "\n".join(lines[n.lineno - 1: n.end_lineno]) for n in nodes}


def changed_line(path: str, mutant: str, functions: dict[str, str]) -> tuple[str, str]:
    """(original line, mutated line) of ``mutant`` (its key ends in ``<function>__mutmut_<n>``)."""
    name = mutant.rsplit(".", 1)[-1]
    orig = functions.get(name.rsplit("__mutmut_", 1)[0] + "__mutmut_orig", "")
    body = [f.splitlines()[1:] for f in (orig, functions.get(name, ""))]  # the def lines differ by name
    diff = [d for d in difflib.ndiff(*body) if d[:2] in ("- ", "+ ")]
    if not diff:  # a default argument changed: compare the signatures without the names
        heads = [f.split("\n", 1)[0].split("(", 1)[-1] for f in (orig, functions.get(name, ""))]
        diff = [d for d in difflib.ndiff(*([h] for h in heads)) if d[:2] in ("- ", "+ ")]
    minus = next((d[2:].strip() for d in diff if d.startswith("- ")), "")
    plus = next((d[2:].strip() for d in diff if d.startswith("+ ")), "")
    return minus, plus


def kind(minus: str, plus: str) -> str:
    if "XX" in plus or (minus.lower() == plus.lower() and minus != plus):
        return "message or key text"
    if re.search(r"warn|_log|log_metrics|meter|history|stacklevel", minus):
        return "logging, warnings, byte accounting"
    if re.search(r"dtype|device|_wide|promote", minus):
        return "dtype / device argument"
    return "other"


def _row(name: str, c: Counter) -> str:
    reached = c["killed"] + c["survived"] + c["timeout"]
    killed = c["killed"] + c["timeout"]  # a mutant that hangs the tests is caught by their timeout
    score = f"{100 * killed / reached:.0f}%" if reached else "–"
    other = sum(c.values()) - reached - c["no tests"]
    return (f"| {name} | {sum(c.values())} | {killed} | {c['survived']} | {c['no tests']} | {other} | {score} | "
            f"{100 * killed / max(1, sum(c.values())):.0f}% |")


def main() -> None:
    modules = collect()
    if not modules:
        sys.exit("no mutants/ results here: run `make mutate` first")
    print("| module | mutants | killed | survived | no tests | other | killed / reached | killed / all |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    packages: dict[str, Counter] = defaultdict(Counter)
    for path, mutants in modules.items():
        c = Counter(mutants.values())
        if sum(c.values()):
            print(_row(path, c))
            packages[str(Path(path).parent)] += c
    for package, c in packages.items():
        print(_row(f"**{package}/**", c))
    kinds: Counter = Counter()
    for path, mutants in modules.items():
        survivors = [name for name, status in mutants.items() if status == "survived"]
        functions = _functions(path) if survivors else {}
        for name in survivors:
            minus, plus = changed_line(path, name, functions)
            kinds[(str(Path(path).parent), kind(minus, plus))] += 1
            if "--survivors" in sys.argv:
                print(f"{name}\n    - {minus}\n    + {plus}")
    if "--kinds" in sys.argv:
        print("\n| package | surviving mutants change | count |\n|---|---|---:|")
        for (package, k), n in sorted(kinds.items()):
            print(f"| {package}/ | {k} | {n} |")


if __name__ == "__main__":
    main()
