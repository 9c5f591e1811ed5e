"""The string form ``Trainer(precision="fp8-msamp")``: a minimal, reversible patch of two Lightning symbols.

Lightning has no precision registry (``StrategyRegistry`` entries' precision plugins are overwritten
by the accelerator connector), so the string needs a patch. ``import lightning_plugins`` applies it
once; it touches only:

1. ``lightning.pytorch.trainer.connectors.accelerator_connector._AcceleratorConnector.__init__``,
   wrapped: ``precision="fp8-msamp"`` is turned into ``precision=None, plugins=[..., MSAMPPrecision()]``
   (exactly what a user passing the plugin instance gets); every other call goes to Lightning unchanged.
2. ``lightning.pytorch.Trainer.__init__.__annotations__["precision"]``: the ``Literal`` of allowed values
   gains ``"fp8-msamp"``, so that ``LightningCLI`` (jsonargparse validates against it) accepts
   ``trainer: {precision: fp8-msamp}``. This needs the patch to be applied before the CLI builds its
   parser, which ``import lightning_plugins`` does.

``"fp8-msamp"`` means ``MSAMPPrecision()``: level ``"O2"`` (the FP8-LM recipe: FP8 GEMMs, FP8 weight
gradients and communication, FP8/FP16 Adam states, FP16 master weights), which needs Adam or AdamW;
pass ``plugins=[MSAMPPrecision(level="O1")]`` for other optimizers or other options.

The patch is applied only for the Lightning versions it was tested with (:data:`TESTED_LIGHTNING`);
outside them :func:`register_precision_flag` raises and ``import lightning_plugins`` warns, and the
plugin instance (``Trainer(plugins=[MSAMPPrecision(...)])``) keeps working with stock Lightning.
``Fabric(precision=...)`` is not patched: use ``Fabric(plugins=[MSAMPFabricPrecision(...)])``.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Iterable
from typing import Any, Literal, Optional, Union, get_args

from packaging.version import Version

__all__ = [
    "PRECISION_FLAG",
    "TESTED_LIGHTNING",
    "register_precision_flag",
    "unregister_precision_flag",
    "is_registered",
    "lightning_version_supported",
]

PRECISION_FLAG = "fp8-msamp"
# [first tested, first untested): the patched private symbols were checked in each tested release.
TESTED_LIGHTNING = ("2.4.0", "2.7.0")

_ORIGINALS: dict[str, Any] = {}
_MARK = "__lightning_plugins_original__"


def _lightning_version() -> str:
    import lightning

    return lightning.__version__


def lightning_version_supported(version: str | None = None) -> bool:
    """Is ``version`` (default: the installed Lightning) inside :data:`TESTED_LIGHTNING`?"""
    v = Version(version or _lightning_version())
    return Version(TESTED_LIGHTNING[0]) <= v < Version(TESTED_LIGHTNING[1])


def _unsupported(reason: str) -> RuntimeError:
    return RuntimeError(
        f"precision={PRECISION_FLAG!r} is not available: {reason}. Lightning has no precision registry, so the string "
        f"form patches private Lightning code and is enabled only for Lightning >={TESTED_LIGHTNING[0]},"
        f"<{TESTED_LIGHTNING[1]}. Pass the plugin instance instead, which works with any Lightning 2.x: "
        "Trainer(plugins=[lightning_plugins.MSAMPPrecision(level='O2')]) (or in a LightningCLI config: "
        "trainer: {plugins: [{class_path: lightning_plugins.MSAMPPrecision, init_args: {level: O2}}]})."
    )


def _targets() -> tuple[type, type]:
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector
    from lightning.pytorch.trainer.trainer import Trainer

    params = inspect.signature(_AcceleratorConnector.__init__).parameters
    if "precision" not in params or "plugins" not in params:
        raise _unsupported("_AcceleratorConnector.__init__ has no 'precision'/'plugins' parameters")
    if "precision" not in getattr(Trainer.__init__, "__annotations__", {}):
        raise _unsupported("Trainer.__init__ has no 'precision' annotation")
    return _AcceleratorConnector, Trainer


def _with_plugin(plugins: Any) -> list[Any]:
    from lightning.pytorch.plugins.precision import Precision

    from lightning_plugins.precision.msamp import MSAMPPrecision

    if plugins is None:
        items: list[Any] = []
    elif isinstance(plugins, str) or not isinstance(plugins, Iterable):
        items = [plugins]
    else:
        items = list(plugins)
    others = [p for p in items if isinstance(p, Precision)]
    if others:
        raise ValueError(
            f"Received both precision={PRECISION_FLAG!r} and the precision plugin {others[0]!r} in plugins; choose "
            f"one (configure FP8 in plugins=[MSAMPPrecision(...)] and drop precision={PRECISION_FLAG!r})."
        )
    return [*items, MSAMPPrecision()]


def _wrap_connector_init(original: Any) -> Any:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        if bound.arguments.get("precision") == PRECISION_FLAG:
            bound.arguments["plugins"] = _with_plugin(bound.arguments.get("plugins"))
            bound.arguments["precision"] = None
        original(*bound.args, **bound.kwargs)

    setattr(__init__, _MARK, original)
    return __init__


def is_registered() -> bool:
    """Is ``precision="fp8-msamp"`` currently enabled?"""
    return bool(_ORIGINALS)


def register_precision_flag() -> None:
    """Enable ``Trainer(precision="fp8-msamp")`` and the LightningCLI value (idempotent).

    Raises:
        RuntimeError: for a Lightning version outside :data:`TESTED_LIGHTNING` or without the
            expected symbols; nothing is patched then. The message says how to pass the plugin instead.
    """
    if _ORIGINALS:
        return
    version = _lightning_version()
    if not lightning_version_supported(version):
        raise _unsupported(f"Lightning {version} is not a tested version")
    connector, trainer = _targets()
    annotations = trainer.__init__.__annotations__
    if PRECISION_FLAG not in _literal_values(annotations["precision"]):
        _ORIGINALS["annotation"] = annotations["precision"]
        annotations["precision"] = Optional[Union[annotations["precision"], Literal["fp8-msamp"]]]
    if not hasattr(connector.__init__, _MARK):
        _ORIGINALS["connector_init"] = connector.__init__
        connector.__init__ = _wrap_connector_init(connector.__init__)
    _ORIGINALS.setdefault("registered", True)


def unregister_precision_flag() -> None:
    """Undo :func:`register_precision_flag` (restores the original Lightning symbols)."""
    if not _ORIGINALS:
        return
    connector, trainer = _targets()
    if "connector_init" in _ORIGINALS:
        connector.__init__ = _ORIGINALS["connector_init"]
    if "annotation" in _ORIGINALS:
        trainer.__init__.__annotations__["precision"] = _ORIGINALS["annotation"]
    _ORIGINALS.clear()


def register_on_import() -> None:
    """What ``import lightning_plugins`` runs: register, or warn (never fail an import) outside the tested range."""
    try:
        register_precision_flag()
    except RuntimeError as err:
        warnings.warn(str(err), UserWarning, stacklevel=3)


def _literal_values(tp: Any) -> set[Any]:
    args = get_args(tp)
    if not args:
        return set()
    values: set[Any] = set()
    for arg in args:
        nested = _literal_values(arg)
        values |= nested if nested else ({arg} if not isinstance(arg, type) else set())
    return values
