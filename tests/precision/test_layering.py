"""Layering (README, Layout): lightning_plugins.precision may import Lightning and lightning_plugins.fp8, never the
callbacks or modules; the FP8 communication code in lightning_plugins.fp8 stays pure torch."""

import ast
from pathlib import Path

import lightning_plugins.precision as precision

FORBIDDEN = ("lightning_plugins.callbacks", "lightning_plugins.modules", "lightning_plugins.cli")


def test_precision_imports_no_callbacks_or_modules():
    for path in Path(precision.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            bad = [n for n in names if n.startswith(FORBIDDEN)]
            assert not bad, f"{path.name} imports {bad}"
