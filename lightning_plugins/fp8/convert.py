"""Swap linear layers for FP8 ones in place, with a filter, exclusions and a report; and swap them back.

Supported layer types (:data:`SUPPORTED_LAYER_TYPES`): ``torch.nn.Linear`` -> :class:`FP8Linear`, and Hugging
Face ``transformers``' ``Conv1D`` (GPT-2 / GPT-J-style projections, a Linear with a transposed weight) ->
:class:`FP8Conv1D`. Every other layer that holds parameters stays in high precision and is listed in the report
with its type and the reason.
"""

from __future__ import annotations

import fnmatch
import logging
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_plugins.fp8.gemm import check_backend_name
from lightning_plugins.fp8.linear import WGRAD_MODES, FP8Conv1D, FP8Linear

__all__ = [
    "DEFAULT_EXCLUDE",
    "SUPPORTED_LAYER_TYPES",
    "LayerDecision",
    "ConversionReport",
    "convert_to_fp8",
    "revert_fp8",
    "matches_pattern",
]

log = logging.getLogger(__name__)

DEFAULT_EXCLUDE: tuple[str, ...] = ("lm_head",)
SUPPORTED_LAYER_TYPES: tuple[str, ...] = ("torch.nn.Linear", "transformers.pytorch_utils.Conv1D")
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _conv1d_type() -> type | None:
    # transformers is never imported here: a model holding a Conv1D has imported it already
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def _linear_kind(mod: nn.Module) -> str | None:
    """``"linear"`` / ``"conv1d"`` for a convertible layer type (subclasses included, judged later), else None."""
    if isinstance(mod, nn.Linear):
        return "linear"
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(mod, conv1d):
        return "conv1d"
    return None


def _features(mod: nn.Module, kind: str) -> tuple[int, int]:
    if kind == "conv1d":
        in_features, out_features = mod.weight.shape
        return int(in_features), int(out_features)
    return mod.in_features, mod.out_features


@dataclass(frozen=True)
class LayerDecision:
    """What :func:`convert_to_fp8` did with one linear layer."""

    name: str
    in_features: int
    out_features: int
    status: str  # "converted", "already FP8", "skipped", or "not supported"
    reason: str = ""
    layer_type: str = "Linear"


@dataclass
class ConversionReport:
    """Outcome of :func:`convert_to_fp8`: one :class:`LayerDecision` per linear layer."""

    decisions: list[LayerDecision] = field(default_factory=list)
    unmatched_exclude: tuple[str, ...] = ()

    @property
    def converted(self) -> list[LayerDecision]:
        """Layers swapped by this call."""
        return [d for d in self.decisions if d.status == "converted"]

    @property
    def already_fp8(self) -> list[LayerDecision]:
        """Layers that were FP8Linear before this call."""
        return [d for d in self.decisions if d.status == "already FP8"]

    @property
    def skipped(self) -> list[LayerDecision]:
        """Linear layers left as they were, each with its reason."""
        return [d for d in self.decisions if d.status == "skipped"]

    @property
    def unsupported(self) -> list[LayerDecision]:
        """Other layers holding parameters (embeddings, norms, convolutions...): kept in high precision."""
        return [d for d in self.decisions if d.status == "not supported"]

    def rows(self) -> list[dict[str, object]]:
        """One dict per layer (name, type, in, out, status, reason): for a CSV file or a logger table."""
        return [
            {
                "layer": d.name or "<root>",
                "type": d.layer_type,
                "in": d.in_features if d.status != "not supported" else "",
                "out": d.out_features if d.status != "not supported" else "",
                "status": d.status,
                "reason": d.reason,
            }
            for d in self.decisions
        ]

    def table(self) -> str:
        """A plain-text table: layer, type, shape, status and reason, under a summary line."""
        header = (
            f"FP8 conversion: {len(self.converted)} converted, {len(self.already_fp8)} already FP8, "
            f"{len(self.skipped)} skipped, {len(self.unsupported)} other layers kept in high precision "
            f"(supported layer types: {', '.join(SUPPORTED_LAYER_TYPES)})"
        )
        rows = [("layer", "type", "in", "out", "status", "reason")]
        rows += [
            (str(r["layer"]), str(r["type"]), str(r["in"]), str(r["out"]), str(r["status"]), str(r["reason"]))
            for r in self.rows()
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [header]
        for r in rows:
            lines.append("  " + "  ".join(r[i].ljust(widths[i]) for i in range(5)) + ("  " + r[5] if r[5] else ""))
        if self.unmatched_exclude:
            lines.append(f"exclude patterns that matched no linear layer: {list(self.unmatched_exclude)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def matches_pattern(name: str, pattern: str) -> bool:
    """Does the module name ``name`` match an exclusion ``pattern``?

    A pattern with ``*``, ``?`` or ``[`` is an ``fnmatch`` glob over the full dotted name.
    Otherwise it matches whole dotted components: ``"lm_head"`` matches ``"lm_head"`` and
    ``"model.lm_head"`` (and everything below ``lm_head``), but ``"head"`` does not match ``"lm_head"``.
    """
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    parts, sub = name.split("."), pattern.split(".")
    return any(parts[i : i + len(sub)] == sub for i in range(len(parts) - len(sub) + 1))


def _normalize_exclude(exclude: str | Iterable[str] | None) -> tuple[str, ...]:
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        return (exclude,)
    try:
        patterns = tuple(exclude)
    except TypeError:
        raise TypeError(f"exclude must be a string or an iterable of strings, got {type(exclude).__name__}.") from None
    bad = [p for p in patterns if not isinstance(p, str) or not p]
    if bad:
        raise TypeError(f"exclude patterns must be non-empty strings, got {bad!r}.")
    return patterns


def _has_hooks(mod: nn.Module) -> bool:
    return any(
        getattr(mod, attr, None)
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


def _skip_reason(
    name: str,
    mod: nn.Module,
    kind: str,
    patterns: tuple[str, ...],
    matched: set[str],
    module_filter_fn: Callable[[nn.Module, str], bool] | None,
    owners: dict[int, list[tuple[int, str]]],
    dim_multiple: int,
) -> str:
    hits = [p for p in patterns if matches_pattern(name, p)]
    matched.update(hits)
    if hits:
        return f"excluded by pattern {hits[0]!r}"
    if module_filter_fn is not None and not module_filter_fn(mod, name):
        return "module_filter_fn returned False"
    if getattr(mod, "use_fp32_linear", False):
        return "opt-out attribute use_fp32_linear=True"
    if kind == "linear" and type(mod) is not nn.Linear and type(mod).__name__ == "FSDPLinear":
        return "fully_shard was applied to this layer itself; apply it to the block that holds the layer"
    if kind == "linear" and type(mod) is not nn.Linear:
        return f"{type(mod).__name__} is a subclass of nn.Linear; only plain nn.Linear is converted"
    if kind == "conv1d" and type(mod) is not _conv1d_type():
        return f"{type(mod).__name__} is a subclass of Conv1D; only plain Conv1D is converted"
    for pname in ("weight", "bias"):
        param = getattr(mod, pname)
        others = [fqn for owner, fqn in owners.get(id(param), ()) if owner != id(mod)] if param is not None else []
        if others:
            return f"tied {pname} (shared with {', '.join(others)})"
    for dim_name, dim in zip(("in_features", "out_features"), _features(mod, kind)):
        if dim % dim_multiple:
            return f"{dim_name}={dim} is not a multiple of {dim_multiple}"
    if mod.weight.dtype not in _COMPUTE_DTYPES:
        return f"weight dtype {mod.weight.dtype} is not fp32/bf16/fp16"
    if _has_hooks(mod):
        return "has forward/backward hooks; register them after conversion"
    return ""


def convert_to_fp8(
    module: nn.Module,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
    exclude: str | Iterable[str] | None = DEFAULT_EXCLUDE,
    *,
    dim_multiple: int = 16,
    backend: str = "auto",
    amax_history_len: int = 16,
    margin: int = 0,
    wgrad_mode: str = "dequantized",
    use_fast_accum: bool = True,
    log_table: bool = True,
    in_place: bool = False,
) -> ConversionReport:
    """Replace eligible linear layers of ``module`` by :class:`FP8Linear` (``Conv1D``: :class:`FP8Conv1D`), in place.

    A layer is converted when it is a plain ``nn.Linear`` (or ``transformers`` ``Conv1D``) that no ``exclude``
    pattern matches,
    ``module_filter_fn(layer, name)`` accepts, has no tied weight/bias, has ``in_features`` and
    ``out_features`` divisible by ``dim_multiple``, an fp32/bf16/fp16 weight, no hooks, and no
    ``use_fp32_linear = True`` attribute. Parameters are reused (not copied), so the state dict
    keys and an optimizer built before or after conversion stay valid. Running it again is safe:
    existing FP8 layers are reported as "already FP8".

    Args:
        module: the model; it cannot itself be an ``nn.Linear`` (wrap it, e.g. in ``nn.Sequential``).
        module_filter_fn: ``(layer, fully qualified name) -> bool``; False keeps the layer as is.
        exclude: name patterns to keep in high precision (see :func:`matches_pattern`), by default
            ``("lm_head",)``. Patterns you pass that match nothing trigger a warning.
        dim_multiple: required divisor of both dimensions (16 for the CUDA FP8 kernels; 1 disables).
        backend, amax_history_len, margin, wgrad_mode, use_fast_accum: passed to :class:`FP8Linear`.
        log_table: log the report table at INFO level (logger ``lightning_plugins.fp8.convert``).
        in_place: turn the layer objects themselves into FP8 layers (class swap, :meth:`FP8Linear.convert_in_place`)
            instead of replacing them: for models already sharded with FSDP2, which holds references to them.

    Returns:
        A :class:`ConversionReport` (``print(report)`` shows the table): every linear layer, converted or not,
        and every other layer holding parameters, each with its type and the reason it was not converted.

    Raises:
        RuntimeError: when no layer is FP8 afterwards (never a silent no-op); the message holds the table.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_to_fp8 expects an nn.Module, got {type(module).__name__}.")
    if isinstance(module, nn.Linear):
        raise ValueError(
            "convert_to_fp8 swaps layers in place, so the root module cannot be an nn.Linear itself; "
            "wrap it, e.g. convert_to_fp8(nn.Sequential(layer))."
        )
    if module_filter_fn is not None and not callable(module_filter_fn):
        raise TypeError(f"module_filter_fn must be callable (module, name) -> bool, got {module_filter_fn!r}.")
    if isinstance(dim_multiple, bool) or not isinstance(dim_multiple, int) or dim_multiple < 1:
        raise ValueError(f"dim_multiple must be an int >= 1 (1 disables the check), got {dim_multiple!r}.")
    check_backend_name(backend)
    if wgrad_mode not in WGRAD_MODES:
        raise ValueError(f"Unknown wgrad_mode {wgrad_mode!r}; allowed: {list(WGRAD_MODES)}.")
    user_patterns = exclude is not DEFAULT_EXCLUDE
    patterns = _normalize_exclude(exclude)
    layer_kwargs = {
        "backend": backend,
        "amax_history_len": amax_history_len,
        "margin": margin,
        "wgrad_mode": wgrad_mode,
        "use_fast_accum": use_fast_accum,
    }

    # param -> (owning module, name); a weight owned by another module (e.g. an embedding) is tied.
    owners: dict[int, list[tuple[int, str]]] = {}
    for mname, sub in module.named_modules(remove_duplicate=False):
        for pname, param in sub.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((id(sub), f"{mname}.{pname}" if mname else pname))

    report = ConversionReport()
    matched: set[str] = set()
    replaced: dict[int, nn.Module] = {}  # a layer registered under several names is swapped everywhere
    for name, mod in list(module.named_modules(remove_duplicate=False)):
        if isinstance(mod, FP8Linear):
            if id(mod) not in replaced:
                replaced[id(mod)] = mod
                report.decisions.append(
                    LayerDecision(name, mod.in_features, mod.out_features, "already FP8", "", type(mod).__name__)
                )
            continue
        kind = _linear_kind(mod)
        if kind is None:
            if id(mod) not in replaced and _holds_parameters(mod):
                replaced[id(mod)] = mod
                report.decisions.append(_unsupported_decision(name, mod))
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        if id(mod) in replaced:
            setattr(parent, child_name, replaced[id(mod)])
            continue
        in_features, out_features = _features(mod, kind)
        layer_type = type(mod).__name__
        reason = _skip_reason(name, mod, kind, patterns, matched, module_filter_fn, owners, dim_multiple)
        if reason:
            report.decisions.append(LayerDecision(name, in_features, out_features, "skipped", reason, layer_type))
            replaced[id(mod)] = mod
            continue
        if in_place:
            new = (FP8Conv1D if kind == "conv1d" else FP8Linear).convert_in_place(
                mod, in_features, out_features, **layer_kwargs
            )
        elif kind == "conv1d":
            new = FP8Conv1D.from_conv1d(mod, **layer_kwargs)
        else:
            new = FP8Linear.from_linear(mod, **layer_kwargs)
        setattr(parent, child_name, new)
        replaced[id(mod)] = new
        report.decisions.append(LayerDecision(name, in_features, out_features, "converted", "", layer_type))

    # the default patterns are not the user's: that a model has no lm_head is no news
    report.unmatched_exclude = tuple(p for p in patterns if p not in matched) if user_patterns else ()
    if report.unmatched_exclude:
        warnings.warn(
            f"convert_to_fp8: exclude patterns {list(report.unmatched_exclude)} matched no linear layer; "
            "check the names with [n for n, m in model.named_modules()].",
            UserWarning,
            stacklevel=2,
        )
    if not report.converted and not report.already_fp8:
        if not report.skipped:
            raise RuntimeError(
                f"convert_to_fp8 found no layer of a supported type ({', '.join(SUPPORTED_LAYER_TYPES)}) in "
                f"{type(module).__name__}; FP8 training would change nothing. Remove the FP8 precision setting for "
                "this model.\n" + report.table()
            )
        raise RuntimeError(
            "convert_to_fp8 converted no layer, so FP8 training would silently run in high precision. Each "
            "linear layer's reason is in the table below: relax module_filter_fn/exclude or dim_multiple where "
            "that is the reason, or remove the FP8 precision setting.\n" + report.table()
        )
    if log_table:
        log.info("%s", report.table())
    return report


def revert_fp8(module: nn.Module, layers: Iterable[nn.Module] | None = None) -> int:
    """Swap FP8 layers back to the plain layers they were converted from (``nn.Linear`` / ``Conv1D``), in place.

    The plain layer gets the FP8 layer's current parameters (the same objects, so an optimizer and the state dict
    keys stay valid); FP8 weight gradients are dropped. Scaling states are not kept: save them first
    (:class:`~lightning_plugins.fp8.ScalingRegistry`) if a later conversion should continue them.

    Args:
        module: the model.
        layers: only these FP8 layers (default: every :class:`FP8Linear` of ``module``).

    Returns:
        The number of layers swapped back.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"revert_fp8 expects an nn.Module, got {type(module).__name__}.")
    if isinstance(module, FP8Linear):
        raise ValueError("revert_fp8 swaps layers in place, so the root module cannot be an FP8Linear itself.")
    wanted = None if layers is None else {id(m) for m in layers}
    restored: dict[int, nn.Module] = {}
    for name, mod in list(module.named_modules(remove_duplicate=False)):
        if not isinstance(mod, FP8Linear) or (wanted is not None and id(mod) not in wanted):
            continue
        if id(mod) not in restored:
            restored[id(mod)] = mod.to_source_layer()
        parent_name, _, child_name = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child_name, restored[id(mod)])
    return len(restored)


def _holds_parameters(mod: nn.Module) -> bool:
    return any(True for _ in mod.parameters(recurse=False))


def _unsupported_decision(name: str, mod: nn.Module) -> LayerDecision:
    shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in mod.named_parameters(recurse=False))
    kind = "a container holding parameters directly" if any(True for _ in mod.children()) else "not a linear layer"
    return LayerDecision(
        name, 0, 0, "not supported", f"{kind} ({shapes}); kept in high precision", type(mod).__name__
    )
