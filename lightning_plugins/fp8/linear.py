"""``FP8Linear``: a drop-in ``nn.Linear`` whose GEMMs run in FP8 (MS-AMP's recipe).

Forward: input and weight in E4M3, ``y = x @ W^T`` with fast accumulation, output in the autocast
dtype (or the input dtype), bias added in that dtype. Backward: output gradient in E5M2,
``dx = dy @ W`` and ``dW = dy^T @ x`` with high-precision accumulation; ``dW`` is rounded to E4M3
(just-in-time scale). The input and the weight are saved for backward as FP8 (1 byte/element).

Non-finite values are detected before every cast (an E4M3 cast would turn inf into 448): the
layer's :class:`ScalingState` counts them, and the affected output/gradients are set to NaN so
the usual non-finite checks (e.g. a precision plugin skipping the step) still see them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from lightning_plugins.fp8.gemm import check_backend_name, get_backend
from lightning_plugins.fp8.quantize import ScaledTensor, quantize_with_state
from lightning_plugins.fp8.scaling import ScalingState, scaling_frozen
from lightning_plugins.fp8.wgrad import WeightGradSlot, detach_fp8_grad

__all__ = ["FP8Linear", "FP8Conv1D", "WGRAD_MODES", "SCALING_ROLES"]

WGRAD_MODES = ("dequantized", "fp8")
SCALING_ROLES = ("input", "weight", "grad_output", "wgrad")
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NAN = float("nan")


def _poison(t: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    # NaN everywhere when an operand was non-finite (0-d mask: no host sync).
    return t.masked_fill_(bad, _NAN)


def _autocast_available(device_type: str) -> bool:
    # cpu/cuda answered without the call: torch < 2.12 cannot trace is_autocast_available (a torch.compile
    # graph break at every FP8Linear).
    return device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type)


def _no_autocast(device_type: str) -> Any:
    # The emulated GEMM is a plain fp32 matmul, which autocast would silently run in bf16/fp16.
    if _autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        token: torch.Tensor | None,
        layer: FP8Linear,
        out_dtype: torch.dtype,
        record: bool,
    ) -> torch.Tensor:
        lead_shape = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        backend = get_backend(layer.backend, x.device)
        # the GEMMs see the weight as [out, in]; a Conv1D-style layer stores it as [in, out]
        weight_oi = weight.t() if layer.transposed_weight else weight
        with _no_autocast(x.device.type):
            xq, x_bad = quantize_with_state(x2, layer.input_scaling, record)
            if weight.dtype == torch.float8_e4m3fn:
                # gathered in FP8 by a sharding extension (FSDP2, level O3, lightning_plugins.fp8.fsdp): already
                # cast with the scale every rank agreed on, whose inverse (NaN: not finite) it left on the layer
                scale_inv = layer.fp8_gathered_scale_inv.clone()
                wq, w_bad = ScaledTensor(weight_oi, scale_inv), ~torch.isfinite(scale_inv)
            else:
                wq, w_bad = quantize_with_state(weight_oi, layer.weight_scaling, record)
            y = backend.mm(xq, wq.t(), out_dtype, use_fast_accum=layer.use_fast_accum)
            y = _poison(y, x_bad | w_bad)
        ctx.save_for_backward(xq.data, xq.scale_inv, wq.data, wq.scale_inv)
        ctx.layer = layer
        ctx.record = record
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.weight = weight if ctx.needs_input_grad[1] else None
        return y.reshape(*lead_shape, y.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_data, x_scale_inv, w_data, w_scale_inv = ctx.saved_tensors
        layer: FP8Linear = ctx.layer
        backend = get_backend(layer.backend, dy.device)
        dx = dw = None
        with _no_autocast(dy.device.type):
            dyq, dy_bad = quantize_with_state(dy.reshape(-1, w_data.shape[0]), layer.grad_output_scaling, ctx.record)
            if ctx.needs_input_grad[0]:
                dx = backend.mm(dyq, ScaledTensor(w_data, w_scale_inv), ctx.x_dtype)
                dx = _poison(dx, dy_bad).reshape(ctx.x_shape)
            if ctx.needs_input_grad[1] or (ctx.needs_input_grad[2] and layer.wgrad_mode == "fp8"):
                dw_hp = backend.mm(dyq.t(), ScaledTensor(x_data, x_scale_inv), torch.float32)
                if layer.transposed_weight:
                    dw_hp = dw_hp.t().contiguous()
                dw = layer._deliver_weight_grad(ctx.weight, dw_hp, dy_bad, ctx.record)
        ctx.weight = None
        token_grad = torch.zeros((), device=dy.device) if ctx.needs_input_grad[2] else None
        return dx, dw, token_grad, None, None, None


class FP8Linear(nn.Module):
    """Linear layer with FP8 GEMMs and FP8-saved activations; same parameters as ``nn.Linear``.

    Its ``state_dict`` has exactly ``weight`` (and ``bias``), so it loads into ``nn.Linear`` and
    back. The scaling states are child modules with non-persistent buffers (they follow
    ``.to(device)``); save them with :meth:`get_scaling_state`.

    Amaxes are recorded only in training steps: not in ``eval()`` mode, not under
    ``torch.no_grad()``, not inside :func:`~lightning_plugins.fp8.frozen_scaling`.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: add a learnable bias.
        device: parameter device.
        dtype: parameter (master weight) dtype.
        backend: FP8 GEMM backend, one of ``"auto"``, ``"torch"``, ``"emulated"``, ``"te"``.
        amax_history_len: delayed-scaling window for the input and the output gradient.
        margin: powers of two of headroom in every scale.
        wgrad_mode: ``"dequantized"``: the E4M3-rounded weight gradient is handed to autograd in
            the weight dtype (any optimizer works); ``"fp8"``: it is kept as E4M3 in the FP8
            side channel (:func:`~lightning_plugins.fp8.get_fp8_grad`) and ``weight.grad`` stays
            ``None`` (for an FP8 optimizer).
        use_fast_accum: fast (lower-precision) accumulation for the forward GEMM, as MS-AMP.
    """

    #: the weight is stored ``[out, in]`` (``nn.Linear``); :class:`FP8Conv1D` stores it ``[in, out]``
    transposed_weight = False
    #: set on a layer whose FP8 weight gradient a sharding wrapper reduces (FSDP2 at O2/O3,
    #: :mod:`lightning_plugins.fp8.fsdp`): the gradient is computed into the slot (``wgrad_mode="fp8"``) even while
    #: the weight is registered with ``requires_grad=False``, and the slot's storage may be released between steps
    wgrad_without_requires_grad = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str = "auto",
        amax_history_len: int = 16,
        margin: int = 0,
        wgrad_mode: str = "dequantized",
        use_fast_accum: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        self.backend = check_backend_name(backend)
        if self.backend == "te":
            get_backend("te")  # fail at construction, not at the first forward
        self.in_features = in_features
        self.out_features = out_features
        self.amax_history_len = amax_history_len
        self.margin = margin
        self.use_fast_accum = bool(use_fast_accum)
        factory = {"device": device, "dtype": dtype}
        shape = (in_features, out_features) if self.transposed_weight else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(*shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self._build_states(device)
        self.wgrad_mode = wgrad_mode
        self.reset_parameters()

    def _build_states(self, device: torch.device | str | None) -> None:
        self.input_scaling = ScalingState("e4m3", self.amax_history_len, self.margin, device=device)
        self.weight_scaling = ScalingState("e4m3", 1, self.margin, device=device)
        self.grad_output_scaling = ScalingState("e5m2", self.amax_history_len, self.margin, device=device)
        self.wgrad_scaling = ScalingState("e4m3", 1, self.margin, device=device)
        self.wgrad_slot: WeightGradSlot | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if self.wgrad_slot is not None:  # after unpickling or copy.deepcopy: deliver to this layer's weight
            self.wgrad_slot.bind(self)

    @property
    def wgrad_mode(self) -> str:
        """``"dequantized"`` or ``"fp8"`` (see the class docstring); settable, e.g. by a precision plugin."""
        return self._wgrad_mode

    @wgrad_mode.setter
    def wgrad_mode(self, mode: str) -> None:
        if mode not in WGRAD_MODES:
            raise ValueError(f"Unknown wgrad_mode {mode!r}; allowed: {list(WGRAD_MODES)}.")
        self._wgrad_mode = mode
        if mode == "fp8" and self.wgrad_slot is None:
            self.wgrad_slot = WeightGradSlot(self, device=self.input_scaling.scale.device)
        elif mode != "fp8":
            self.wgrad_slot = None

    def reset_parameters(self) -> None:
        """Same initialisation as ``nn.Linear``."""
        nn.init.kaiming_uniform_(self.weight.t() if self.transposed_weight else self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> FP8Linear:
        """Wrap an ``nn.Linear``: the *same* parameter objects are reused (no copy) and custom
        instance attributes are carried over. ``kwargs`` go to the constructor (backend, ...)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}.")
        return cls._adopt(linear, linear.in_features, linear.out_features, **kwargs)

    @classmethod
    def _adopt(cls, linear: nn.Module, in_features: int, out_features: int, **kwargs: Any) -> FP8Linear:
        # Build on meta (no init work), then adopt the source layer's parameters.
        layer = cls(in_features, out_features, bias=linear.bias is not None, device="meta", **kwargs)
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._build_states(linear.weight.device)
        layer.wgrad_mode = layer.wgrad_mode  # rebuilds the FP8 gradient slot (if any) on the weight's device
        layer.train(linear.training)
        standard = {"training", "in_features", "out_features"}
        for key, value in vars(linear).items():
            if not key.startswith("_") and key not in standard and not hasattr(layer, key):
                setattr(layer, key, value)
        # kept outside the module tree (not a child: no duplicate state-dict keys) for to_source_layer()
        object.__setattr__(layer, "_source_layer", linear)
        return layer

    @classmethod
    def convert_in_place(cls, layer: nn.Module, in_features: int, out_features: int, **kwargs: Any) -> FP8Linear:
        """Turn this very ``nn.Linear``/``Conv1D`` object into an FP8 layer (its class is swapped, its parameters and
        every reference to the object stay valid, as FSDP2 needs: it re-sets the gathered parameters on the module
        object it saw at ``fully_shard`` time). :meth:`to_source_layer` swaps the class back."""
        source_cls = type(layer)
        probe = cls(in_features, out_features, bias=layer.bias is not None, device="meta", **kwargs)
        weight = layer.weight
        layer.__class__ = cls
        for key in ("backend", "amax_history_len", "margin", "use_fast_accum"):
            setattr(layer, key, getattr(probe, key))
        layer.in_features, layer.out_features = in_features, out_features
        layer._build_states(weight.device)
        layer.wgrad_mode = probe.wgrad_mode
        object.__setattr__(layer, "_in_place_source", source_cls)
        return layer

    def to_source_layer(self) -> nn.Module:
        """The plain layer this one was converted from, holding this layer's current parameters.

        Layers built directly (not by :meth:`from_linear`) give a new ``nn.Linear``; a layer converted in place
        (:meth:`convert_in_place`) becomes its plain class again. The FP8 weight gradient, if any, is dropped.
        """
        detach_fp8_grad(self.weight)
        source_cls = self.__dict__.get("_in_place_source")
        if source_cls is not None:
            for name in ("input_scaling", "weight_scaling", "grad_output_scaling", "wgrad_scaling", "wgrad_slot"):
                self._modules.pop(name, None)
            for key in ("backend", "amax_history_len", "margin", "use_fast_accum", "wgrad_slot", "_wgrad_mode",
                        "_in_place_source", "wgrad_without_requires_grad", "fp8_gathered_scale_inv"):
                self.__dict__.pop(key, None)
            self.__class__ = source_cls
            return self
        source = self.__dict__.get("_source_layer")
        if source is None:
            source = self._new_source_layer()
        source.weight = self.weight
        source.bias = self.bias
        source.train(self.training)
        return source

    def _new_source_layer(self) -> nn.Module:
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FP8Linear expects a torch.Tensor input, got {type(x).__name__}.")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"FP8Linear expects inputs of shape (..., {self.in_features}), got {tuple(x.shape)}.")
        if x.dtype not in _COMPUTE_DTYPES:
            raise TypeError(
                f"FP8Linear input dtype must be one of {list(_COMPUTE_DTYPES)}, got {x.dtype}; cast the input."
            )
        device_type = x.device.type
        autocast_on = _autocast_available(device_type) and torch.is_autocast_enabled(device_type)
        out_dtype = torch.get_autocast_dtype(device_type) if autocast_on else x.dtype
        record = self.training and torch.is_grad_enabled() and not scaling_frozen()
        if self.wgrad_mode == "fp8" and self.weight.requires_grad and not self.weight.is_leaf:
            raise RuntimeError(
                "wgrad_mode='fp8' stores the gradient on the weight parameter, but this weight is not a leaf "
                "tensor (a parametrization?); use wgrad_mode='dequantized'."
            )
        # the slot's token takes part only while the weight needs a gradient (its hook attaches the FP8 one)
        wants_wgrad = self.weight.requires_grad or self.wgrad_without_requires_grad
        token = self.wgrad_slot.token if self.wgrad_slot is not None and wants_wgrad else None
        y = _FP8LinearFunction.apply(x, self.weight, token, self, out_dtype, record)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _deliver_weight_grad(
        self, weight: torch.Tensor, dw: torch.Tensor, dy_bad: torch.Tensor, record: bool
    ) -> torch.Tensor | None:
        if self.wgrad_mode == "dequantized":
            q, bad = quantize_with_state(dw, self.wgrad_scaling, record)
            return _poison(q.dequantize(weight.dtype), bad | dy_bad)
        slot = self.wgrad_slot
        if self.wgrad_without_requires_grad and slot.data.untyped_storage().size() == 0:
            # a sharded reduction freed the full-size slot after the last step: allocate it again, empty
            slot.data.untyped_storage().resize_(slot.data.numel() * slot.data.element_size())
            slot.data.zero_()
            slot.scale_inv.zero_()
        q, bad = quantize_with_state(slot.add_to(dw), self.wgrad_scaling, record)
        # A NaN scale_inv makes the whole stored gradient dequantize to NaN.
        q.scale_inv = torch.where(bad | dy_bad, torch.full_like(q.scale_inv, _NAN), q.scale_inv)
        slot.store(q)
        return None

    def scaling_states(self) -> dict[str, ScalingState]:
        """The four scaling states by role: ``input``, ``weight``, ``grad_output``, ``wgrad``."""
        return {
            "input": self.input_scaling,
            "weight": self.weight_scaling,
            "grad_output": self.grad_output_scaling,
            "wgrad": self.wgrad_scaling,
        }

    def get_scaling_state(self) -> dict[str, dict[str, Any]]:
        """Checkpointable scaling states, keyed by role."""
        return {role: state.get_scaling_state() for role, state in self.scaling_states().items()}

    def set_scaling_state(self, state: dict[str, dict[str, Any]]) -> None:
        """Restore what :meth:`get_scaling_state` returned."""
        roles = self.scaling_states()
        unknown = set(state) - set(roles)
        if unknown:
            raise ValueError(f"Unknown scaling roles {sorted(unknown)}; allowed: {list(SCALING_ROLES)}.")
        for role, value in state.items():
            roles[role].set_scaling_state(value)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"backend={self.backend}, wgrad_mode={self.wgrad_mode}"
        )


class FP8Conv1D(FP8Linear):
    """FP8 counterpart of Hugging Face ``transformers``' ``Conv1D`` (GPT-2, GPT-J-style blocks).

    ``Conv1D(nf, nx)`` is a Linear with its weight stored transposed: ``weight [nx, nf] = [in, out]`` and
    ``y = x @ weight + bias``. This layer keeps that layout (so its ``state_dict`` loads into ``Conv1D`` and
    back) and runs the same FP8 GEMMs as :class:`FP8Linear` on the transposed view.
    """

    transposed_weight = True

    @classmethod
    def from_conv1d(cls, conv: nn.Module, **kwargs: Any) -> FP8Conv1D:
        """Wrap a ``Conv1D`` (same parameter objects, attributes such as ``nf``/``nx`` kept)."""
        weight = getattr(conv, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise TypeError(f"from_conv1d expects a Conv1D with a 2-D weight, got {type(conv).__name__}.")
        in_features, out_features = weight.shape
        return cls._adopt(conv, in_features, out_features, **kwargs)

    def _new_source_layer(self) -> nn.Module:
        from transformers.pytorch_utils import Conv1D

        with torch.device("meta"):
            return Conv1D(self.out_features, self.in_features)
