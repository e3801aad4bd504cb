"""Summarise a `mutmut run` (the `mutants/` folder): killed / survived / not reached, per module and per package.

Usage: python tools/mutation_report.py [--survivors]   (run from the repository root after `make mutate`)

mutmut 3 records each mutant's exit code in ``mutants/<path>.meta``; its own table (``status_by_exit_code``) says
what a code means. "no tests": no selected test reached the mutated function. Only the in-process tests are
selected (pyproject ``[tool.mutmut]``), so that is code checked only by the multi-process and subprocess tests, or
not at all.
"""

from __future__ import annotations

import json
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
    if "--survivors" in sys.argv:
        for path, mutants in modules.items():
            for name, status in mutants.items():
                if status == "survived":
                    print(f"{path}: {name}")


if __name__ == "__main__":
    main()
