"""No function of the core (bench/**/*.py) is longer than MAX_LINES: a longer one is split
into named steps (issue 20). Lengths count from the `def` line to the function's last line,
decorators and docstring included, nested functions within their parent's lines too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
MAX_LINES = 60


def long_functions(path: Path, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    """(qualified name, lines) of every function in `path` longer than `limit` lines."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}."
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = child.end_lineno - child.lineno + 1
                if lines > limit:
                    found.append((name[:-1], lines))
            visit(child, name)

    visit(ast.parse(path.read_text()), "")
    return found


def test_no_core_function_is_longer_than_the_limit() -> None:
    too_long = [
        f"{path.relative_to(ROOT)}::{name} ({lines} lines)"
        for path in sorted(BENCH.rglob("*.py"))
        for name, lines in long_functions(path)
    ]
    assert not too_long, f"functions over {MAX_LINES} lines: {', '.join(too_long)}"


def test_the_check_counts_lines_and_sees_nested_functions(tmp_path: Path) -> None:
    # guards against a vacuous pass: a long method and a long nested function are found
    body = "".join(f"    x{i} = {i}\n" for i in range(60))
    src = tmp_path / "m.py"
    src.write_text(
        f"class A:\n  def method(self):\n{body}\n"
        f"def outer():\n  def inner():\n{body}  return inner\n"
        "def short():\n    return 1\n"
    )
    assert long_functions(src) == [("A.method", 61), ("outer", 63), ("outer.inner", 61)]
    assert long_functions(src, limit=61) == [("outer", 63)]
