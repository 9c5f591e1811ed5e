"""Helpers around the FP8 optimizers: LR-scheduler re-binding, state-byte accounting, portable state dicts."""

from __future__ import annotations

from collections.abc import Iterable
from functools import wraps
from typing import Any
from weakref import ref

import torch

from lightning_plugins.fp8.optim import FORMAT_OPTIONS, _FP8AdamBase
from lightning_plugins.fp8.quantize import dequantize
from lightning_plugins.fp8.wgrad import get_fp8_grad

__all__ = ["rebind_lr_schedulers", "optimizer_state_bytes", "training_state_bytes", "to_torch_adam_state_dict"]


def _track_step_calls(opt: torch.optim.Optimizer) -> None:
    # What LRScheduler.__init__ does to its optimizer, so the scheduler's "lr_scheduler.step() before
    # optimizer.step()" check keeps working after the swap.
    if hasattr(opt.step, "_wrapped_by_lr_sched"):
        return
    opt_ref = ref(opt)
    func = opt.step.__func__  # type: ignore[attr-defined]

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        target = opt_ref()
        target._opt_called = True  # type: ignore[union-attr]
        return func.__get__(target, target.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    opt.step = wrapper  # type: ignore[method-assign]


def rebind_lr_schedulers(schedulers: Iterable[Any], old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> int:
    """Point every LR scheduler that drove ``old`` at ``new``; returns how many were re-bound.

    ``schedulers`` may hold LR schedulers or objects with a ``scheduler`` attribute (e.g. Lightning's
    ``LRSchedulerConfig``); nested schedulers of ``SequentialLR``/``ChainedScheduler`` are followed.
    The schedule itself (``last_epoch``, ``base_lrs``) is untouched; with :func:`from_optimizer`
    the param-group dicts are shared, so the learning rates carry over.
    """
    count = 0
    stack = [getattr(s, "scheduler", s) for s in schedulers]
    seen: set[int] = set()
    while stack:
        sched = stack.pop()
        if sched is None or id(sched) in seen:
            continue
        seen.add(id(sched))
        if getattr(sched, "optimizer", None) is old:
            sched.optimizer = new
            count += 1
        stack.extend(getattr(sched, "_schedulers", ()) or ())
    if count:
        _track_step_calls(new)
    return count


def _kind(key: str) -> str:
    if key.endswith("scale_inv") or key.endswith("_scale"):
        return "scales"
    if key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step", "master"):
        return key
    return "other"


def optimizer_state_bytes(
    optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor] | None = None
) -> dict[str, float]:
    """Persistent optimizer + master-weight bytes, by kind, for ``params`` (default: all optimized params).

    Kinds: ``master`` (the storage of master weights: for an FP8 optimizer, FP8Linear weights under
    ``master_weights="fp16"`` or ``"fp16_scaled"``; a plain model weight is not a master and is not
    counted), ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``scales`` (per-tensor scale_inv),
    ``step``, ``other``. Also ``total``, ``numel`` (elements of the selected params) and
    ``bytes_per_param`` (``total / numel``). Gradients are not included. States exist after the
    first step that gave a parameter a gradient.
    """
    all_params = [p for g in optimizer.param_groups for p in g["params"]]
    if params is None:
        selected = all_params
    else:
        ids = {id(p) for p in params}
        selected = [p for p in all_params if id(p) in ids]
    out: dict[str, float] = dict.fromkeys(
        ("master", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "scales", "step", "other"), 0
    )
    numel = 0
    seen: set[int] = set()
    for p in selected:
        if id(p) in seen:
            continue
        seen.add(id(p))
        numel += p.numel()
        if isinstance(optimizer, _FP8AdamBase) and optimizer.is_master(p):
            out["master"] += p.numel() * p.element_size()
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                out[_kind(key)] += value.numel() * value.element_size()
    out["total"] = sum(out[k] for k in list(out))
    out["numel"] = numel
    out["bytes_per_param"] = out["total"] / numel if numel else 0.0
    return out


def training_state_bytes(params: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Persistent training-state bytes of ``params``: parameter storage, gradients and optimizer state.

    Parameter storage is the master copy (fp32, or FP16 for O2's FP8 layers); gradients are ``.grad`` plus the FP8
    side-channel gradients (measure while they exist, e.g. in ``on_before_optimizer_step``); optimizer state comes
    from :func:`optimizer_state_bytes` without its ``master`` entry (that is the parameter storage already counted).
    Returns bytes per parameter by kind (``*_Bpp``), ``total_Bpp``, ``total_bytes``, ``numel`` and ``weight_dtypes``.
    """
    params = list({id(p): p for p in params}.values())
    numel = sum(p.numel() for p in params)
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = 0
    for p in params:
        if p.grad is not None:
            grads += p.grad.numel() * p.grad.element_size()
        fp8_grad = get_fp8_grad(p)
        if fp8_grad is not None:
            grads += fp8_grad.nbytes
    opt = optimizer_state_bytes(optimizer, params)
    states = {k: float(opt[k]) for k in ("exp_avg", "exp_avg_sq", "scales", "step", "other", "max_exp_avg_sq")}
    total = weights + grads + sum(states.values())

    def per(value: float) -> float:
        return value / numel if numel else 0.0

    return {
        "numel": numel,
        "weights_Bpp": per(weights),
        "grads_Bpp": per(grads),
        "exp_avg_Bpp": per(states["exp_avg"]),
        "exp_avg_sq_Bpp": per(states["exp_avg_sq"]),
        "scales_step_other_Bpp": per(states["scales"] + states["step"] + states["other"] + states["max_exp_avg_sq"]),
        "total_Bpp": per(total),
        "total_bytes": total,
        "weight_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in params}),
    }


def to_torch_adam_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of an FP8 Adam(W) state dict in ``torch.optim.Adam``/``AdamW`` form (fp32 moments).

    ``exp_avg``/``exp_avg_sq`` are dequantized (and ``sqrt(v)`` squared back), scales and FP8
    format options are dropped, so a stock ``torch.optim.AdamW`` built on the same param groups can
    load it (a portable optimizer checkpoint). The moments are exactly what the FP8 optimizer would
    use at its next step.
    """
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("Expected an optimizer state dict with 'state' and 'param_groups' keys.")
    sqrt_of = {}
    groups = []
    for group in state_dict["param_groups"]:
        for pid in group["params"]:
            sqrt_of[pid] = bool(group.get("sqrt_exp_avg_sq", False))
        groups.append({k: v for k, v in group.items() if k not in FORMAT_OPTIONS and k != "bias_correction"})
    state = {}
    for pid, s in state_dict["state"].items():
        if not s or "exp_avg_scale_inv" not in s:
            state[pid] = dict(s)
            continue
        m = dequantize(s["exp_avg"], s["exp_avg_scale_inv"])
        v = dequantize(s["exp_avg_sq"], s["exp_avg_sq_scale_inv"])
        if sqrt_of.get(pid, False):
            v = v * v
        state[pid] = {"step": s["step"].clone(), "exp_avg": m, "exp_avg_sq": v}
    return {"state": state, "param_groups": groups}
