"""Replacing a LightningModule's methods on its instance (``training_step``...) and restoring them."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def wrap(pl_module: pl.LightningModule, wrapped: dict[str, Any], name: str, fn: Any) -> None:
    """Set ``fn`` as the module's ``name``, keeping the instance's previous one in ``wrapped`` (once)."""
    if name not in wrapped:
        wrapped[name] = pl_module.__dict__.get(name)
    # set on the instance: Lightning looks hooks up with getattr, and is_overridden sees a new function
    pl_module.__dict__[name] = fn


def user_step(pl_module: pl.LightningModule, wrapped: dict[str, Any], name: str) -> Any:
    """The module's own ``name`` method (bound), or ``None`` if it does not define one."""
    previous = wrapped[name] if name in wrapped else pl_module.__dict__.get(name)
    if previous is not None:
        return previous
    if getattr(type(pl_module), name) is getattr(pl.LightningModule, name):
        return None
    return getattr(type(pl_module), name).__get__(pl_module)


def restore(pl_module: pl.LightningModule, wrapped: dict[str, Any]) -> None:
    """Put back the methods ``wrapped`` holds (removing those the instance did not have)."""
    for name, previous in wrapped.items():
        pl_module.__dict__.pop(name, None)
        if previous is not None:
            pl_module.__dict__[name] = previous
