"""Detection backends: one :class:`~lightning_plugins.modules.detection.backends.base.DetectionBackend` contract over
torchvision, Hugging Face transformers and mmdet detectors, built by name with :func:`build_backend`.

=================  =====================================================  ===========================================
backend            models (first = default)                               module
=================  =====================================================  ===========================================
``torchvision``    ``fcos``, ``retinanet``, ``fasterrcnn``, ``ssdlite``    :mod:`.torchvision` (``TorchvisionBackend``)
``transformers``   ``deformable_detr``, ``detr``                          :mod:`.transformers` (``TransformersBackend``)
``mmdet``          whatever ``MMDetBackend`` accepts                      :mod:`.mmdet` (imported only when asked for)
=================  =====================================================  ===========================================

Backends are imported lazily, so ``import lightning_plugins.modules.detection`` costs neither transformers nor mmdet.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, Iterable, Optional

from lightning_plugins.modules.detection.backends.base import DetectionBackend, Prediction, Target

#: backend name -> "module:Class" of its adapter (the class takes ``num_classes``, ``model`` and keyword arguments)
BACKENDS: dict[str, str] = {
    "torchvision": "lightning_plugins.modules.detection.backends.torchvision:TorchvisionBackend",
    "transformers": "lightning_plugins.modules.detection.backends.transformers:TransformersBackend",
    "mmdet": "lightning_plugins.modules.detection.backends.mmdet:MMDetBackend",
}

#: the model each backend builds when ``model`` is ``None``
DEFAULT_MODELS: dict[str, Optional[str]] = {"torchvision": "fcos", "transformers": "deformable_detr", "mmdet": None}

__all__ = ["BACKENDS", "DEFAULT_MODELS", "DetectionBackend", "Prediction", "Target", "build_backend",
           "backend_class", "backend_options", "unknown_name_error"]


def unknown_name_error(kind: str, name: Any, allowed: Iterable[str]) -> ValueError:
    """``ValueError`` naming the unknown ``name``, the allowed values and the closest one ("did you mean")."""
    allowed = sorted(allowed)
    close = difflib.get_close_matches(str(name), allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}: allowed are {allowed}{hint}")


def backend_class(backend: str) -> type:
    """The adapter class registered for ``backend`` (imported on first use)."""
    if backend not in BACKENDS:
        raise unknown_name_error("detection backend", backend, BACKENDS)
    module_name, _, class_name = BACKENDS[backend].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and module_name.startswith(err.name):
            raise ImportError(
                f"detection backend {backend!r} needs the module {module_name}, which is not installed in this tree "
                f"({err}); use backend='torchvision' or 'transformers', or add {module_name}"
            ) from err
        raise ImportError(f"detection backend {backend!r} needs a package that is missing: {err}") from err
    try:
        return getattr(module, class_name)
    except AttributeError as err:
        raise ImportError(f"{module_name} defines no {class_name} (needed by detection backend {backend!r})") from err


def build_backend(backend: str = "torchvision", model: Optional[str] = None, num_classes: int = 10,
                  **kwargs: Any) -> DetectionBackend:
    """Build a detection backend by name.

    Args:
        backend: ``"torchvision"``, ``"transformers"`` or ``"mmdet"``.
        model: the backend's model name; ``None`` picks the backend's default (``fcos``, ``deformable_detr``).
        num_classes: object classes (labels ``0..num_classes-1``; no background class).
        **kwargs: the backend's own options (see ``TorchvisionBackend`` / ``TransformersBackend``); an unknown
            one is a ``ValueError`` naming it.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    cls = backend_class(backend)
    if model is None:
        model = DEFAULT_MODELS.get(backend)
    _check_options(backend, cls, kwargs)
    if model is None:  # a backend without a default model here (mmdet): let its class decide
        return cls(num_classes=num_classes, **kwargs)
    return cls(num_classes=num_classes, model=model, **kwargs)


def backend_options(cls: type) -> Optional[list[str]]:
    """The keyword options ``cls`` takes besides ``num_classes`` and ``model`` (``None``: it takes any)."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.name not in ("self", "num_classes", "model")
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def _check_options(backend: str, cls: type, kwargs: dict[str, Any]) -> None:
    allowed = backend_options(cls)
    if allowed is None:
        return
    for name in kwargs:
        if name not in allowed:
            raise unknown_name_error(f"option of detection backend {backend!r}", name, allowed)
