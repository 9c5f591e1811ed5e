"""``precision="fp8-msamp"`` without ``import lightning_plugins`` (wheel installs; standard library only).

A wheel install puts ``lightning_plugins-autoregister.pth`` into site-packages. At interpreter start it loads this
file by path (without importing ``lightning_plugins``, which would import torch and Lightning into every Python
process) and calls :func:`install`. That adds an import hook which waits for ``lightning.fabric.connector`` (imported
by both the Trainer and Fabric) and wraps its ``_convert_precision_to_unified_args``: the first time a Trainer or
Fabric is asked for ``"fp8-msamp"``, it runs ``import lightning_plugins``, which registers the flag as the import
always does, and the construction goes on. Every other value goes to Lightning untouched, and nothing else of ours is
imported until then. Set ``LIGHTNING_PLUGINS_NO_AUTOREGISTER=1`` to turn the hook off.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from typing import Any

TARGET = "lightning.fabric.connector"
FLAG = "fp8-msamp"
DISABLE_ENV = "LIGHTNING_PLUGINS_NO_AUTOREGISTER"


def _lazy_convert(original: Any) -> Any:
    def _convert_precision_to_unified_args(precision: Any) -> Any:
        if precision == FLAG:
            from lightning_plugins.precision.registration import register_precision_flag

            register_precision_flag()  # what `import lightning_plugins` does (idempotent)
            return FLAG
        return original(precision)

    _convert_precision_to_unified_args.__wrapped__ = original  # type: ignore[attr-defined]
    return _convert_precision_to_unified_args


class _HookLoader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        original = getattr(module, "_convert_precision_to_unified_args", None)
        if callable(original):
            module._convert_precision_to_unified_args = _lazy_convert(original)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _HookLoader(spec.loader)
        return spec


# The .pth line: one line, standard library only, silent on any failure (it runs at every interpreter start).
PTH_NAME = "lightning_plugins-autoregister.pth"
PTH_LINE = (
    "import sys; exec(\"try:\\n import importlib.util as u, os\\n s = u.find_spec('lightning_plugins')\\n"
    " f = os.path.join(s.submodule_search_locations[0], '_autoregister.py')\\n"
    " m = u.module_from_spec(u.spec_from_file_location('_lightning_plugins_autoregister', f))\\n"
    " m.__spec__.loader.exec_module(m)\\n m.install()\\nexcept Exception:\\n pass\")\n"
)


def install() -> None:
    """Add the import hook once (nothing when disabled or when Lightning's connector is imported already)."""
    if os.environ.get(DISABLE_ENV) or TARGET in sys.modules:
        return
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
