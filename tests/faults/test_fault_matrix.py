"""docs/reliability.md's fault matrix and the fault tests name each other: every row's test exists,
and every fault test has its row."""
from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ["fault", "means in the test", "client sees", "lost", "detected by", "recovery", "test"]


def _rows() -> list[list[str]]:
    with open(os.path.join(ROOT, "docs", "reliability.md"), encoding="utf-8") as handle:
        text = handle.read()
    table = text.split("## The fault matrix", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == COLUMNS
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def _fault_tests() -> set[str]:
    found = set()
    for name in sorted(os.listdir(HERE)):
        if name.startswith("test_fault_") and name.endswith(".py") and name != "test_fault_matrix.py":
            with open(os.path.join(HERE, name), encoding="utf-8") as handle:
                tree = ast.parse(handle.read())
            found |= {f"{name}::{node.name}" for node in tree.body
                      if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    return found


def test_every_row_names_an_existing_fault_test_and_says_everything():
    tests = _fault_tests()
    for row in _rows():
        assert len(row) == len(COLUMNS) and all(row), row
        named = re.sub(r"\[.*\]$", "", row[-1].strip("`"))
        assert named in tests, f"{row[0]}: no test {named}"


def test_every_fault_test_has_a_row():
    named = {re.sub(r"\[.*\]$", "", row[-1].strip("`")) for row in _rows()}
    missing = _fault_tests() - named
    assert not missing, f"fault tests missing from docs/reliability.md: {sorted(missing)}"
