"""FP8 Adam/AdamW (MS-AMP's O2 optimizers): low-precision moments and FP16 master weights.

Per parameter and step, in fp32 (MS-AMP's ``LBAdamW``/``LBAdam`` arithmetic)::

    g = dequantize(grad)                  # fp32 .grad, or the FP8 side-channel grad, or both summed
    θ = the param (or its master) in fp32
    AdamW: θ ← θ·(1 − lr·wd)              Adam: g ← g + wd·θ
    m' = β1·deq(m) + (1−β1)·g
    v' = β2·deq(v) + (1−β2)·g²
    θ ← θ − lr/bc1 · m' / (sqrt(v')/sqrt(bc2) + eps)     # the *unquantized* m', v'
    m ← quantize(m'), v ← quantize(v')    # each with its own power-of-two per-tensor scale
    param ← θ (rounded to the master format)

Which parameter gets which storage (the rule):

* **Moments, every parameter** (as MS-AMP's O2): ``exp_avg`` in ``exp_avg_dtype`` (default E4M3)
  and ``exp_avg_sq`` in ``exp_avg_sq_dtype`` (default FP16), each with an fp32 ``*_scale_inv``.
  These are per-group options, so a group (e.g. biases and norms) can keep ``"fp32"`` moments.
* **Master weights, only the weights of FP8Linear layers** of the ``model`` passed to the
  optimizer, according to ``master_weights``:

  - ``"fp16"`` (default when a model is given): the parameter itself becomes the FP16 master
    (``param.data`` is turned into float16 in place when the optimizer is built; FP8Linear casts it
    to E4M3 in every forward, as MS-AMP casts its FP16 master). 2 bytes/param. Unlike MS-AMP there
    is no per-tensor scale on it, because FP8Linear reads ``param.data`` as the weight value; a
    power-of-two scale changes nothing in fp16's normal range, so the difference is limited to
    elements with ``|w| < 2**-14`` (fp16 subnormals, absolute error <= 3e-8).
  - ``"fp16_scaled"``: MS-AMP's master numerics exactly: after every step (and when the optimizer
    is built) the fp32 param is rounded onto the FP16 grid with a per-tensor power-of-two scale,
    so ``param.data == dequantize(fp16 master, scale)`` bit for bit. The FP16 master is therefore
    not stored a second time (``quantize(param, "fp16")`` recovers it exactly); the param keeps
    4 bytes/param.
  - ``"fp32"``: no master; the param is updated in its own dtype.

* Every other parameter is updated in place **in its own dtype** (fp32 exact; a bf16/fp16
  param gets the fp32 result rounded back; MS-AMP silently dropped such updates).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_plugins.fp8.formats import FP16, get_format
from lightning_plugins.fp8.fsdp import local_tensor
from lightning_plugins.fp8.linear import FP8Linear
from lightning_plugins.fp8.multi_tensor import amax_many, dequantize_many, quantize_many_into
from lightning_plugins.fp8.quantize import quantize
from lightning_plugins.fp8.scaling import pow2_scale
from lightning_plugins.fp8.wgrad import clear_fp8_grads, get_fp8_grad

__all__ = [
    "FP8Adam",
    "FP8AdamW",
    "from_optimizer",
    "EXP_AVG_DTYPES",
    "EXP_AVG_SQ_DTYPES",
    "MASTER_WEIGHTS",
    "fp8_linear_weights",
]

EXP_AVG_DTYPES = ("e4m3", "fp16", "fp32")
EXP_AVG_SQ_DTYPES = ("fp16", "fp32")
MASTER_WEIGHTS = ("fp16", "fp16_scaled", "fp32")

# Group options that fix the storage format of the state; a checkpoint must match them.
FORMAT_OPTIONS = ("exp_avg_dtype", "exp_avg_sq_dtype", "sqrt_exp_avg_sq", "master_weights")

_STATE_DTYPES = {"e4m3": torch.float8_e4m3fn, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {torch.float8_e4m3fn: "e4m3", torch.float16: "fp16", torch.float32: "fp32"}

# Parameters updated together per _foreach call, in elements: bounds the fp32 working copies (about 24 bytes per
# element). On a GPU large chunks save kernel launches; on the CPU small ones let the allocator reuse the same
# memory chunk after chunk (fresh pages for a whole model's temporaries cost more than the launches saved).
_CHUNK_NUMEL = {"cpu": 1 << 18}
_CHUNK_NUMEL_DEFAULT = 1 << 26

# torch.optim.Adam(W) options this implementation refuses when enabled: option -> how to fix.
_UNSUPPORTED = {
    "amsgrad": "MS-AMP's FP8 Adam has no AMSGrad variant; build the optimizer with amsgrad=False",
    "fused": "the FP8 update is a per-tensor fp32 computation; build the optimizer with fused=None (or False)",
    "foreach": "the FP8 update runs tensor by tensor; build the optimizer with foreach=None (or False)",
    "capturable": "CUDA-graph capture is not supported; build the optimizer with capturable=False",
    "differentiable": "differentiating through the FP8 update is not supported; use differentiable=False",
}


def fp8_linear_weights(model: nn.Module) -> list[nn.Parameter]:
    """The ``weight`` parameters of every :class:`FP8Linear` in ``model`` (each once)."""
    seen: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        if isinstance(mod, FP8Linear):
            seen.setdefault(id(mod.weight), mod.weight)
    return list(seen.values())


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _normalize_dtype(option: str, value: Any, allowed: tuple[str, ...]) -> str:
    if isinstance(value, torch.dtype) and value in _DTYPE_NAMES:
        value = _DTYPE_NAMES[value]
    if isinstance(value, str) and value.lower() in allowed:
        return value.lower()
    raise ValueError(f"{option}={value!r} is not supported; allowed: {list(allowed)} (or the matching torch dtypes).")


def _check_unsupported(options: dict[str, Any], where: str) -> None:
    for name, fix in _UNSUPPORTED.items():
        if options.get(name):
            raise ValueError(f"FP8 Adam does not support {name}={options[name]!r} ({where}): {fix}.")


def _store(x: torch.Tensor, fmt_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a fp32 moment to its storage format: (data, fp32 0-d scale_inv)."""
    if fmt_name == "fp32":
        return x, torch.ones((), dtype=torch.float32, device=x.device)
    q, _ = quantize(x, fmt_name)  # just-in-time power-of-two scale, previous scale 1 (as MS-AMP)
    return q.data, q.scale_inv


def _store_many(
    values: list[torch.Tensor], states: list[dict[str, Any]], key: str, fmt_name: str, group: Any = None
) -> None:
    """Write fp32 moments into their states' storage (in place), each quantized with its own scale. With a
    process ``group`` (sharded parameters) the scale comes from the amax over every rank's shard, so that all
    ranks hold the same per-tensor scale (one ``all_reduce`` per call)."""
    datas = [local_tensor(s[key]) for s in states]
    scale_invs = [s[f"{key}_scale_inv"] for s in states]
    if fmt_name == "fp32":
        torch._foreach_copy_(datas, values)
    elif group is None:
        quantize_many_into(values, get_format(fmt_name), datas, scale_invs)
    else:
        fmt = get_format(fmt_name)
        amax = amax_many(values)
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
        scales = pow2_scale(amax, fmt.max)
        scaled = torch._foreach_mul(values, list(scales.unbind(0)))
        torch._foreach_clamp_min_(scaled, -fmt.max)
        torch._foreach_clamp_max_(scaled, fmt.max)
        torch._foreach_copy_(datas, scaled)
        torch._foreach_copy_(scale_invs, list(torch.reciprocal(scales).unbind(0)))


def _shard_group(params: list[torch.Tensor]) -> Any:
    """The process group of sharded (DTensor, 1-D mesh) parameters, or None."""
    for p in params:
        if local_tensor(p) is not p:
            return p.device_mesh.get_group()
    return None


def _like_param(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A state tensor for ``p``: for a sharded parameter a DTensor laid out like it (for sharded checkpoints)."""
    if local_tensor(p) is p:
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _chunks(sizes: list[int], max_numel: int) -> list[tuple[int, int]]:
    """Consecutive index ranges whose sizes add up to at most ``max_numel`` (a larger single size: alone)."""
    ranges, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > max_numel:
            ranges.append((start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def _round_to_fp16_scaled(thetas: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 values rounded onto the per-tensor-scaled FP16 grid (MS-AMP's master), returned in fp32."""
    rounded = [torch.empty_like(t, dtype=torch.float16) for t in thetas]
    scale_invs = [torch.ones((), dtype=torch.float32, device=t.device) for t in thetas]
    quantize_many_into(thetas, FP16, rounded, scale_invs)
    return dequantize_many(rounded, scale_invs)


class _FP8AdamBase(torch.optim.Optimizer):
    """Shared implementation of :class:`FP8Adam` and :class:`FP8AdamW` (see the module docstring)."""

    _force_decoupled: bool | None = None

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        bias_correction: bool = True,
        decoupled_weight_decay: bool = False,
        exp_avg_dtype: str | torch.dtype = "e4m3",
        exp_avg_sq_dtype: str | torch.dtype = "fp16",
        sqrt_exp_avg_sq: bool = False,
        master_weights: str | None = None,
        model: nn.Module | Iterable[torch.Tensor] | None = None,
        amsgrad: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        _check_unsupported(
            {
                "amsgrad": amsgrad,
                "foreach": foreach,
                "fused": fused,
                "capturable": capturable,
                "differentiable": differentiable,
            },
            "constructor argument",
        )
        if model is None:
            self._master_ids: set[int] = set()
        elif isinstance(model, nn.Module):
            self._master_ids = {id(p) for p in fp8_linear_weights(model)}
        else:
            self._master_ids = {id(p) for p in model}
        if master_weights is None:
            master_weights = "fp16" if model is not None else "fp32"
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": bool(maximize),
            "bias_correction": bool(bias_correction),
            "decoupled_weight_decay": bool(decoupled_weight_decay),
            "exp_avg_dtype": exp_avg_dtype,
            "exp_avg_sq_dtype": exp_avg_sq_dtype,
            "sqrt_exp_avg_sq": bool(sqrt_exp_avg_sq),
            "master_weights": master_weights,
        }
        self._validate_hparams(defaults, "defaults")
        super().__init__(params, defaults)
        if model is not None:
            mine = {id(p) for g in self.param_groups for p in g["params"]}
            if not self._master_ids & mine:
                raise ValueError(
                    f"model has no FP8Linear weight among this optimizer's parameters ({type(model).__name__}); "
                    "convert the model first (lightning_plugins.fp8.convert_to_fp8), pass the parameters of "
                    "that model, or leave model=None (no master weights)."
                )
        elif any(g["master_weights"] != "fp32" for g in self.param_groups):
            raise ValueError(
                f"master_weights={master_weights!r} needs to know which parameters are FP8Linear weights; "
                "pass model=<the converted model> (or an iterable of those weights), or master_weights='fp32'."
            )

    # ------------------------------------------------------------------ groups and validation

    def _validate_hparams(self, group: dict[str, Any], where: str) -> None:
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"lr as a tensor must have one element, got shape {tuple(lr.shape)} ({where}).")
        if not _as_float(lr) >= 0.0:
            raise ValueError(f"Invalid learning rate lr={lr!r} ({where}); it must be >= 0.")
        if not _as_float(eps) >= 0.0:
            raise ValueError(f"Invalid eps={eps!r} ({where}); it must be >= 0.")
        if not _as_float(wd) >= 0.0:
            raise ValueError(f"Invalid weight_decay={wd!r} ({where}); it must be >= 0.")
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r} ({where}).")
        for i, beta in enumerate(betas):
            if not 0.0 <= _as_float(beta) < 1.0:
                raise ValueError(f"Invalid betas[{i}]={beta!r} ({where}); it must be in [0, 1).")
        group["exp_avg_dtype"] = _normalize_dtype("exp_avg_dtype", group["exp_avg_dtype"], EXP_AVG_DTYPES)
        group["exp_avg_sq_dtype"] = _normalize_dtype("exp_avg_sq_dtype", group["exp_avg_sq_dtype"], EXP_AVG_SQ_DTYPES)
        if group["master_weights"] not in MASTER_WEIGHTS:
            raise ValueError(
                f"master_weights={group['master_weights']!r} is not supported; allowed: {list(MASTER_WEIGHTS)}."
            )
        if self._force_decoupled is not None:
            group["decoupled_weight_decay"] = self._force_decoupled

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (validated; FP8Linear weights get their master format applied here)."""
        index = len(self.param_groups)
        _check_unsupported(param_group, f"param group {index}")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_hparams(group, f"param group {index}")
        for p in group["params"]:
            if p.is_complex():
                raise ValueError(f"FP8 Adam does not support complex parameters (param group {index}).")
            if not p.is_floating_point():
                raise ValueError(f"FP8 Adam needs floating-point parameters, got {p.dtype} (param group {index}).")
        self._prepare_masters(group)

    @torch.no_grad()
    def _prepare_masters(self, group: dict[str, Any]) -> None:
        mode = group["master_weights"]
        for p in group["params"]:
            if id(p) not in self._master_ids or mode == "fp32":
                continue
            if local_tensor(p) is not p and p.dtype != torch.float16 and mode == "fp16":
                raise ValueError(
                    f"An FP8Linear weight is a sharded (FSDP2) {p.dtype} parameter; FP8 Adam cannot turn a shard into "
                    "an FP16 master itself. Let the precision plugin convert the model (MSAMPPrecision with "
                    "ModelParallelStrategy), or use master_weights='fp32'."
                )
            if mode == "fp16":
                if p.dtype != torch.float16:
                    p.data = p.data.to(torch.float16)
                    if p.grad is not None:
                        p.grad = p.grad.to(torch.float16)
            else:  # fp16_scaled: the fp32 param holds the dequantized master exactly
                if p.dtype != torch.float32:
                    raise ValueError(
                        f"master_weights='fp16_scaled' keeps the master in an fp32 parameter, but an FP8Linear "
                        f"weight is {p.dtype}; use master_weights='fp16' or keep the model in fp32."
                    )
                p.copy_(_round_to_fp16_scaled([p.detach()])[0])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Unpickled copies hold new parameter objects: master membership cannot be recovered.
        self.__dict__.setdefault("_master_ids", set())

    def is_master(self, param: torch.Tensor) -> bool:
        """True if ``param`` is an FP8Linear weight handled as a master weight (see ``master_weights``)."""
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return id(param) in self._master_ids and group["master_weights"] != "fp32"
        return False

    # ------------------------------------------------------------------ the update

    @staticmethod
    def _gradient(p: torch.Tensor) -> torch.Tensor | None:
        g = None
        if p.grad is not None:
            if p.grad.is_sparse:
                raise RuntimeError("FP8 Adam does not support sparse gradients; use torch.optim.SparseAdam.")
            grad = local_tensor(p.grad)  # a sharded (FSDP2) parameter: its local shard, like the state
            g = grad if grad.dtype == torch.float32 else grad.float()
        side = get_fp8_grad(p)
        if side is not None:
            g8 = side.dequantize(torch.float32)
            g = g8 if g is None else g + g8
        return g

    @staticmethod
    def _init_state(p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        zeros = torch.zeros(local_tensor(p).shape, dtype=torch.float32, device=p.device)
        m, m_sinv = _store(zeros, group["exp_avg_dtype"])
        v, v_sinv = _store(zeros.clone(), group["exp_avg_sq_dtype"])
        return {
            "step": torch.tensor(0.0, dtype=torch.float32),
            "exp_avg": _like_param(p, m),
            "exp_avg_scale_inv": m_sinv,
            "exp_avg_sq": _like_param(p, v),
            "exp_avg_sq_scale_inv": v_sinv,
        }

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step over every parameter that has a gradient (fp32 ``.grad`` and/or FP8 side channel).

        Gradients are used as they are: skipping a step on inf/NaN is the caller's job. The parameters of a
        group are updated together (``_foreach`` ops, in chunks of a bounded number of elements, which
        bounds the fp32 working copies of the moments); the arithmetic is the per-tensor one of the module
        docstring.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads = [], []
            for p in group["params"]:
                g = self._gradient(p)
                if g is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state.update(self._init_state(p, group))
                params.append(p)
                grads.append(g)
            chunk = _CHUNK_NUMEL.get(params[0].device.type, _CHUNK_NUMEL_DEFAULT) if params else 0
            for start, stop in _chunks([p.numel() for p in params], chunk):
                self._update(params[start:stop], grads[start:stop], group)
        return loss

    def _update(self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict[str, Any]) -> None:
        lr, eps, wd = _as_float(group["lr"]), _as_float(group["eps"]), _as_float(group["weight_decay"])
        beta1, beta2 = (_as_float(b) for b in group["betas"])
        sqrt_v = group["sqrt_exp_avg_sq"]
        states = [self.state[p] for p in params]
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        # For an fp32 param `.float()` is the param itself, so the update is in place (bit-identical to
        # torch's single-tensor Adam with fp32 states); otherwise it is an fp32 copy written back below.
        thetas = [local_tensor(p).detach().float() for p in params]
        if wd != 0:
            if group["decoupled_weight_decay"]:
                torch._foreach_mul_(thetas, 1 - lr * wd)
            else:
                grads = torch._foreach_add(grads, thetas, alpha=wd)
        ms = dequantize_many([local_tensor(s["exp_avg"]) for s in states], [s["exp_avg_scale_inv"] for s in states])
        vs = dequantize_many(
            [local_tensor(s["exp_avg_sq"]) for s in states], [s["exp_avg_sq_scale_inv"] for s in states]
        )
        if sqrt_v:
            torch._foreach_mul_(vs, vs)  # the state holds sqrt(v)
        torch._foreach_lerp_(ms, grads, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        bc1s, bc2s = [], []
        for state in states:
            state["step"] += 1
            step = _as_float(state["step"])
            bc1s.append(1 - beta1**step if group["bias_correction"] else 1.0)
            bc2s.append(1 - beta2**step if group["bias_correction"] else 1.0)
        v_sqrts = torch._foreach_sqrt(vs)
        denoms = torch._foreach_div(v_sqrts, [bc2**0.5 for bc2 in bc2s])
        torch._foreach_add_(denoms, eps)
        torch._foreach_addcdiv_(thetas, ms, denoms, [-(lr / bc1) for bc1 in bc1s])
        shards = _shard_group(params)  # sharded params: per-tensor scales agreed by all ranks
        _store_many(ms, states, "exp_avg", group["exp_avg_dtype"], shards)
        _store_many(v_sqrts if sqrt_v else vs, states, "exp_avg_sq", group["exp_avg_sq_dtype"], shards)
        self._write_back(params, thetas, group)

    def _write_back(self, params: list[torch.Tensor], thetas: list[torch.Tensor], group: dict[str, Any]) -> None:
        """Params whose update ran on an fp32 copy get it back (FP16-scaled masters rounded onto their grid)."""
        scaled = group["master_weights"] == "fp16_scaled"
        masters = [(local_tensor(p), t) for p, t in zip(params, thetas) if scaled and id(p) in self._master_ids]
        copies = [(local_tensor(p), t) for p, t in zip(params, thetas)
                  if not (scaled and id(p) in self._master_ids) and t.data_ptr() != local_tensor(p).data_ptr()]
        if masters:
            torch._foreach_copy_([p for p, _ in masters], _round_to_fp16_scaled([t for _, t in masters]))
        if copies:
            torch._foreach_copy_([p for p, _ in copies], [t for _, t in copies])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset ``.grad`` (as torch) and drop the FP8 side-channel gradients of the optimized params."""
        super().zero_grad(set_to_none=set_to_none)
        clear_fp8_grads(p for g in self.param_groups for p in g["params"])

    # ------------------------------------------------------------------ checkpointing

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict without casting the FP8/FP16 states to the parameter dtype.

        Accepts a state dict of this class (restored bit-exactly; its state formats must match this
        optimizer's) or of ``torch.optim.Adam``/``AdamW`` (its fp32 moments are quantized to this
        optimizer's formats, e.g. to resume a ``bf16-mixed`` run with FP8 states).
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("Expected an optimizer state dict with 'state' and 'param_groups' keys.")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"The state dict has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}; "
                "build the optimizer with the same param groups as the one that was saved."
            )
        for i, (current, saved) in enumerate(zip(self.param_groups, saved_groups)):
            _check_unsupported(saved, f"saved param group {i}")
            for key in FORMAT_OPTIONS:
                if key in saved and saved[key] != current[key]:
                    raise ValueError(
                        f"Saved param group {i} has {key}={saved[key]!r} but this optimizer has {current[key]!r}; "
                        f"build the optimizer with {key}={saved[key]!r} to load this checkpoint."
                    )
        current_formats = [{k: g[k] for k in FORMAT_OPTIONS} for g in self.param_groups]
        # Let torch restore the param groups (hyper-parameters, hooks); the state is restored below.
        super().load_state_dict({**state_dict, "state": {}})
        for group, formats in zip(self.param_groups, current_formats):
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group.update(formats)
            self._validate_hparams(group, "loaded param group")
        id_map = {}
        for saved, group in zip(saved_groups, self.param_groups):
            id_map.update(zip(saved["params"], group["params"]))
        for key, value in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(f"The state dict has state for parameter id {key!r}, which no param group lists.")
            p = id_map[key]
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
            self.state[p] = self._restore_param_state(p, value, group, key)

    def _restore_param_state(self, p: torch.Tensor, saved: dict[str, Any], group: dict[str, Any], key: Any) -> dict:
        if not saved:
            return {}
        if "max_exp_avg_sq" in saved:
            raise ValueError(f"Parameter {key!r} has AMSGrad state (max_exp_avg_sq), which FP8 Adam cannot use.")
        missing = {"step", "exp_avg", "exp_avg_sq"} - set(saved)
        if missing:
            raise ValueError(f"State of parameter {key!r} is missing {sorted(missing)}; it is not an Adam state.")
        step = saved["step"]
        step = (
            step.detach().to(device="cpu", dtype=torch.float32).clone()
            if torch.is_tensor(step)
            else torch.tensor(float(step))
        )
        if "exp_avg_scale_inv" not in saved:  # a torch.optim.Adam(W) state: fp32 moments to quantize
            m = local_tensor(saved["exp_avg"]).detach().to(device=p.device, dtype=torch.float32)
            v = local_tensor(saved["exp_avg_sq"]).detach().to(device=p.device, dtype=torch.float32)
            if group["sqrt_exp_avg_sq"]:
                v = v.sqrt()
            m_data, m_sinv = _store(m.clone(), group["exp_avg_dtype"])
            v_data, v_sinv = _store(v.clone(), group["exp_avg_sq_dtype"])
            return {
                "step": step,
                "exp_avg": _like_param(p, m_data),
                "exp_avg_scale_inv": m_sinv,
                "exp_avg_sq": _like_param(p, v_data),
                "exp_avg_sq_scale_inv": v_sinv,
            }
        restored = {"step": step}
        for name, fmt in (("exp_avg", group["exp_avg_dtype"]), ("exp_avg_sq", group["exp_avg_sq_dtype"])):
            data, sinv = saved[name], saved[f"{name}_scale_inv"]
            if data.dtype != _STATE_DTYPES[fmt] or tuple(local_tensor(data).shape) != tuple(local_tensor(p).shape):
                raise ValueError(
                    f"State {name} of parameter {key!r} is {data.dtype} {tuple(data.shape)}, expected "
                    f"{_STATE_DTYPES[fmt]} {tuple(p.shape)} ({name} format {fmt!r}); was it saved by another optimizer?"
                )
            restored[name] = data.detach().to(device=p.device).clone()  # device only: never the param dtype
            restored[f"{name}_scale_inv"] = sinv.detach().to(device=p.device, dtype=torch.float32).clone()
        return restored


class FP8AdamW(_FP8AdamBase):
    """AdamW with E4M3 first moment, FP16 second moment and FP16 master weights (MS-AMP O2).

    Args:
        params: parameters or param groups (as for ``torch.optim.AdamW``).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        maximize: maximize the objective.
        bias_correction: Adam's bias correction (MS-AMP's option; on by default).
        exp_avg_dtype: first-moment storage, one of ``"e4m3"`` (MS-AMP), ``"fp16"``, ``"fp32"``.
        exp_avg_sq_dtype: second-moment storage, ``"fp16"`` (MS-AMP) or ``"fp32"``.
        sqrt_exp_avg_sq: store ``sqrt(v)`` instead of ``v`` (halves the exponent range, so FP16
            does not underflow on tiny gradients); off by default (MS-AMP's recipe).
        master_weights: storage of FP8Linear weights, ``"fp16"``, ``"fp16_scaled"`` or ``"fp32"``
            (see the module docs); default ``"fp16"`` if ``model`` is given, else ``"fp32"``.
        model: the converted model (its FP8Linear weights get master weights), or an iterable of
            the parameters that should.
        amsgrad, foreach, fused, capturable, differentiable: accepted only when off (clear error otherwise).

    The format options (``exp_avg_dtype``, ``exp_avg_sq_dtype``, ``sqrt_exp_avg_sq``,
    ``master_weights``) may also be set per param group.
    """

    _force_decoupled = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        bias_correction: bool = True,
        exp_avg_dtype: str | torch.dtype = "e4m3",
        exp_avg_sq_dtype: str | torch.dtype = "fp16",
        sqrt_exp_avg_sq: bool = False,
        master_weights: str | None = None,
        model: nn.Module | Iterable[torch.Tensor] | None = None,
        amsgrad: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            maximize=maximize,
            bias_correction=bias_correction,
            decoupled_weight_decay=True,
            exp_avg_dtype=exp_avg_dtype,
            exp_avg_sq_dtype=exp_avg_sq_dtype,
            sqrt_exp_avg_sq=sqrt_exp_avg_sq,
            master_weights=master_weights,
            model=model,
            amsgrad=amsgrad,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
        )

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, **options: Any) -> FP8AdamW:
        """Build an :class:`FP8AdamW` from a ``torch.optim.AdamW`` (or an ``Adam`` with equivalent decay);
        see :func:`from_optimizer`."""
        return from_optimizer(optimizer, _target=cls, **options)


class FP8Adam(_FP8AdamBase):
    """Adam (L2 weight decay added to the gradient) with MS-AMP O2 states; arguments as :class:`FP8AdamW`,
    plus ``decoupled_weight_decay`` (as ``torch.optim.Adam``; True gives AdamW's decay)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        bias_correction: bool = True,
        decoupled_weight_decay: bool = False,
        exp_avg_dtype: str | torch.dtype = "e4m3",
        exp_avg_sq_dtype: str | torch.dtype = "fp16",
        sqrt_exp_avg_sq: bool = False,
        master_weights: str | None = None,
        model: nn.Module | Iterable[torch.Tensor] | None = None,
        amsgrad: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            maximize=maximize,
            bias_correction=bias_correction,
            decoupled_weight_decay=decoupled_weight_decay,
            exp_avg_dtype=exp_avg_dtype,
            exp_avg_sq_dtype=exp_avg_sq_dtype,
            sqrt_exp_avg_sq=sqrt_exp_avg_sq,
            master_weights=master_weights,
            model=model,
            amsgrad=amsgrad,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
        )

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, **options: Any) -> FP8Adam:
        """Build an :class:`FP8Adam` from a ``torch.optim.Adam`` (or an ``AdamW`` with equivalent decay);
        see :func:`from_optimizer`."""
        return from_optimizer(optimizer, _target=cls, **options)


_SOURCE_TYPES = (torch.optim.Adam, torch.optim.AdamW)


def _decoupled(group: dict[str, Any], source: torch.optim.Optimizer) -> bool:
    return isinstance(source, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))


def from_optimizer(
    optimizer: torch.optim.Optimizer,
    *,
    model: nn.Module | Iterable[torch.Tensor] | None = None,
    exp_avg_dtype: str | torch.dtype = "e4m3",
    exp_avg_sq_dtype: str | torch.dtype = "fp16",
    sqrt_exp_avg_sq: bool = False,
    master_weights: str | None = None,
    bias_correction: bool = True,
    _target: type[_FP8AdamBase] | None = None,
) -> FP8Adam | FP8AdamW:
    """Swap a ``torch.optim.Adam``/``AdamW`` for its FP8 counterpart, keeping everything else.

    The new optimizer reuses the *same* param-group dicts (lr, betas, eps, weight_decay, maximize,
    ``initial_lr`` set by schedulers and any custom per-group keys are kept; the FP8 format
    options are added to them), and any existing Adam state is quantized into the FP8 formats.
    ``AdamW`` (or ``Adam(decoupled_weight_decay=True)``) becomes :class:`FP8AdamW`, ``Adam`` becomes
    :class:`FP8Adam`. An optimizer that is already FP8 is returned unchanged. Re-bind LR schedulers
    with :func:`~lightning_plugins.fp8.rebind_lr_schedulers`.

    Args:
        optimizer: a ``torch.optim.Adam`` or ``torch.optim.AdamW`` (exact classes).
        model, exp_avg_dtype, exp_avg_sq_dtype, sqrt_exp_avg_sq, master_weights, bias_correction:
            the FP8 options, as for :class:`FP8AdamW`.

    Raises:
        TypeError: for any other optimizer class.
        ValueError: when an unsupported option is on (amsgrad, fused, foreach, capturable, differentiable).
    """
    if isinstance(optimizer, _FP8AdamBase):
        if _target is not None and not isinstance(optimizer, _target):
            raise TypeError(f"Expected a {_target.__name__}-compatible optimizer, got {type(optimizer).__name__}.")
        return optimizer
    if type(optimizer) not in _SOURCE_TYPES:
        raise TypeError(
            f"from_optimizer supports torch.optim.Adam and torch.optim.AdamW (exact classes), got "
            f"{type(optimizer).__module__}.{type(optimizer).__qualname__}; return one of those from "
            "configure_optimizers, or build FP8Adam/FP8AdamW directly."
        )
    name = type(optimizer).__name__
    for i, group in enumerate(optimizer.param_groups):
        _check_unsupported(group, f"{name} param group {i}")
    decoupled = [_decoupled(g, optimizer) for g in optimizer.param_groups]
    if _target is None:
        _target = FP8AdamW if all(decoupled) else FP8Adam
    for i, (group, dec) in enumerate(zip(optimizer.param_groups, decoupled)):
        if _target is FP8AdamW and not dec and _as_float(group["weight_decay"]) != 0:
            raise ValueError(
                f"{name} param group {i} uses L2 weight decay (weight_decay={group['weight_decay']}), which "
                "FP8AdamW would turn into decoupled decay; use FP8Adam.from_optimizer or from_optimizer()."
            )
        group["decoupled_weight_decay"] = dec
    d = optimizer.defaults
    kwargs: dict[str, Any] = {
        "lr": d.get("lr", 1e-3),
        "betas": d.get("betas", (0.9, 0.999)),
        "eps": d.get("eps", 1e-8),
        "weight_decay": d.get("weight_decay", 0.0),
        "maximize": d.get("maximize", False),
        "bias_correction": bias_correction,
        "exp_avg_dtype": exp_avg_dtype,
        "exp_avg_sq_dtype": exp_avg_sq_dtype,
        "sqrt_exp_avg_sq": sqrt_exp_avg_sq,
        "master_weights": master_weights,
        "model": model,
    }
    if _target is FP8Adam:
        kwargs["decoupled_weight_decay"] = bool(d.get("decoupled_weight_decay", False))
    old_state = {p: dict(s) for p, s in optimizer.state.items() if s}
    new = _target(optimizer.param_groups, **kwargs)
    for p, s in old_state.items():
        group = next(g for g in new.param_groups if any(q is p for q in g["params"]))
        new.state[p] = new._restore_param_state(p, s, group, "from " + name)
    return new
