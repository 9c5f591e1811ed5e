"""Layering (README, Layout): lightning_plugins.fp8 is pure torch and imports no Lightning."""

import ast
from pathlib import Path

import lightning_plugins.fp8 as fp8

FORBIDDEN = {"lightning", "pytorch_lightning", "lightning_fabric"}


def test_fp8_package_imports_no_lightning():
    for path in Path(fp8.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert not roots & FORBIDDEN, f"{path.name} imports {roots & FORBIDDEN}"
