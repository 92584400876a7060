"""House rule: small functions. No function or method in ``echopulse/``, ``pipelines/`` or
``jobs/`` is longer than ~80 lines (docstring included); the CLI's parser helpers
(``echopulse.cli``: ``build_parser``, ``add_<command>_parser``), mostly flag declarations, are
exempt, as is ``bench/`` (scripts)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("echopulse", "pipelines", "jobs")
MAX_LINES = 80
PARSER_HELPER = re.compile(r"^(build_parser|add_\w+_parser)$")


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_80_lines():
    long = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            cli = path == ROOT / "echopulse" / "cli.py"
            long += [f"{path.relative_to(ROOT)}:{line} {name} ({n} lines)" for name, line, n in _functions(path)
                     if n > MAX_LINES and not (cli and PARSER_HELPER.match(name))]
    assert not long, "split these functions: " + "; ".join(long)
