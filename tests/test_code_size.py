"""The library stays readable: no file over 500 lines, no function over 60 lines (issue #14)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("ptqc", "passes", "lowering")


def _files():
    return sorted(p for d in LIBRARY for p in (ROOT / d).rglob("*.py"))


def test_no_file_over_500_lines():
    long = [f"{p.relative_to(ROOT)}: {n}" for p in _files() if (n := len(p.read_text().splitlines())) > 500]
    assert not long, long


def test_no_function_over_60_lines():
    long = []
    for p in _files():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, long
