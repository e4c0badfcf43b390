"""Issue 30's size rule: no module of dfl_tf over 450 lines, no function over 80 (from ``def``
to its last line), checked with ``ast``."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "dfl_tf"
MAX_MODULE, MAX_FUNCTION = 450, 80


def oversized(path: Path) -> list[str]:
    """``path:line name (n lines)`` for the module and each function over the limits."""
    text = path.read_text()
    found = [f"{path.name}: {len(text.splitlines())} lines"] if len(text.splitlines()) > MAX_MODULE else []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION:
                found.append(f"{path.name}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_module_or_function_over_the_limits():
    problems = [p for path in sorted(ROOT.rglob("*.py")) for p in oversized(path)]
    assert not problems, problems


def test_the_check_finds_a_long_function(tmp_path):
    long = tmp_path / "long.py"
    long.write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION + "\n\ndef g():\n    return 1\n")
    assert oversized(long) == [f"long.py:1 f ({MAX_FUNCTION + 1} lines)"]
