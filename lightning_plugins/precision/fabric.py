"""``MSAMPFabricPrecision``: MS-AMP's FP8 recipe (O1/O2/O3) as a Lightning Fabric precision plugin.

It holds everything that does not depend on the Trainer: conversion, the forward context, the
FP8 gradient reduction, the skip-on-inf/NaN optimizer step, clipping, and the scaling state. The
Trainer plugin (:class:`~lightning_plugins.precision.MSAMPPrecision`) adds the optimizer swap in
``connect``, the closure handling and the checkpoint hooks.

Fabric has no ``connect`` hook, so at O2 swap the optimizer yourself::

    plugin = MSAMPFabricPrecision(level="O2")
    fabric = Fabric(plugins=[plugin])
    model = plugin.convert_module(model)
    optimizer = plugin.convert_optimizer(torch.optim.AdamW(model.parameters()), model)
    model, optimizer = fabric.setup(model, optimizer)

``Fabric(precision="fp8-msamp")`` (after ``import lightning_plugins``) builds this plugin at level O2, and
``fabric.clip_gradients(...)`` then includes the FP8 weight gradients (see ``registration.py``).
:meth:`restore_module` swaps the FP8 layers back to the plain ones when you are done.

A model already sharded with FSDP2 (``fully_shard``; Lightning's ``ModelParallelStrategy`` with one data-parallel
dimension) is converted in place, and its FP8 weights, gradients and scales follow the sharded recipe of
:mod:`lightning_plugins.fp8.fsdp` (O3 also gathers the weights in FP8).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any, Literal, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins.precision.precision import Precision as FabricPrecision
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_only
from torch import nn
from torch.optim import Optimizer

from lightning_plugins.fp8 import (
    DEFAULT_EXCLUDE,
    ConversionReport,
    FP8Linear,
    SaturationCounter,
    ScaledTensor,
    ScalingRegistry,
    clear_fp8_grads,
    convert_to_fp8,
    fp8_linear_weights,
    from_optimizer,
    frozen_scaling,
    get_fp8_grad,
    quantize,
    revert_fp8,
    set_fp8_grad,
)
from lightning_plugins.fp8 import fsdp
from lightning_plugins.fp8.comm import fp8_all_reduce
from lightning_plugins.fp8.optim import _FP8AdamBase
from lightning_plugins.precision import grads, settings
from lightning_plugins.precision.fp8_stats import fp8_statistics

__all__ = ["MSAMPFabricPrecision"]

log = logging.getLogger(__name__)

_STATE_VERSION = 1
_WGRAD_DTYPE = torch.float8_e4m3fn  # FP8Linear's weight-gradient format


class MSAMPFabricPrecision(FabricPrecision):
    """FP8 training with MS-AMP's recipe for Lightning Fabric (and the base of the Trainer plugin).

    Args:
        level: ``"O1"``: FP8 GEMMs (E4M3 activations/weights, E5M2 output gradients, FP8-saved
            activations), E4M3-rounded weight gradients in ``.grad`` and FP8 gradient communication;
            weights and optimizer untouched (any optimizer). ``"O2"``: O1 plus FP16 master weights
            for the FP8 layers, E4M3 weight gradients kept in FP8, and Adam/AdamW swapped for
            :class:`~lightning_plugins.fp8.FP8AdamW`/``FP8Adam`` (E4M3 first moment, FP16 second moment).
            ``"O3"``: O2 on a model sharded with FSDP2 (``ModelParallelStrategy``), whose FP8 weights are also
            all-gathered in FP8 (1 byte per element, one scale per tensor agreed by all ranks); masters and Adam
            states exist only as shards. O1 and O2 work sharded too (O2: FP16 master shards, FP8 gradients
            reduce-scattered as E4M3).
        backend: FP8 GEMM backend: ``"auto"`` (``"torch"`` on CUDA compute capability >= 8.9, else
            ``"emulated"``), ``"torch"``, ``"emulated"`` or ``"te"``.
        module_filter_fn: ``(module, fully qualified name) -> bool``; False keeps an ``nn.Linear`` as is.
        exclude: module-name patterns kept in high precision (whole dotted components, or globs).
        compute_dtype: autocast dtype of the non-FP8 ops: ``None`` = bf16 on CUDA and fp32 (no
            autocast) on CPU, where bf16 is much slower; or ``"bfloat16"``/``"float32"``.
        dim_multiple: both dimensions of a converted layer must be multiples of this (16 for the
            CUDA FP8 kernels).
        amax_history_len: delayed-scaling window for activations and output gradients.
        margin: powers of two of headroom in every FP8 scale.
        grad_comm: ``"fp8"``: FP8 weight gradients travel between data-parallel ranks as E4M3 bytes
            with per-tensor scales, summed in fp32; ``"hp"``: they are all-reduced in fp32.
        exp_avg_dtype: O2 first-moment storage (``"e4m3"``, ``"fp16"``, ``"fp32"``).
        exp_avg_sq_dtype: O2 second-moment storage (``"fp16"``, ``"fp32"``).
        sqrt_exp_avg_sq: O2: store ``sqrt(v)`` (avoids FP16 underflow of tiny second moments).
        master_weights: O2 storage of FP8-layer weights: ``"fp16"`` (2 bytes, MS-AMP), ``"fp16_scaled"``
            (fp32 param on the scaled FP16 grid) or ``"fp32"``.
        checkpoint_format: ``"native"`` (FP16 masters and FP8 optimizer states, compact, exact) or
            ``"portable"`` (fp32 weights and ``torch.optim.Adam`` states; a plain run can resume it).
            Used by the Trainer plugin's checkpoint hooks.
        restore_layers: Trainer plugin: at the end of every Trainer run (fit, validate, test, predict; also after an
            error) swap the FP8 layers back to the plain layers they came from, with the weights in their original
            dtype, so the model stays portable and a later run in another precision trains every weight; the next
            FP8 run converts it again and continues the FP8 scales. ``False`` leaves the FP8 layers in the model.
            With Fabric, call :meth:`restore_module` yourself.
        log_fp8_stats: Trainer plugin: FP8 metrics sent to the loggers at their cadence (``log_every_n_steps``):
            ``"summary"`` (per role: amax, scale range, share of clipped values; skipped steps), ``"per_layer"``
            (also per layer) or ``"off"``. The conversion report is written as ``fp8_conversion.csv``/``.txt`` into
            the logger's folder either way.
    """

    precision = "fp8-msamp"
    # The Trainer may call convert_module again with a new model (fit, then fit another); Fabric must not
    # silently drop the scaling states of a first model.
    _replaces_model = False
    # Fabric + ModelParallelStrategy: Fabric converts before sharding, so the conversion waits for the sharded module
    # (registration wraps the strategy's parallelize_fn to convert right after it). A class default, so that plugin
    # objects pickled by another version (ddp_spawn, checkpoints) still have it.
    _convert_when_sharded = False

    def __init__(
        self,
        level: Literal["O1", "O2", "O3"] = "O2",
        backend: Literal["auto", "torch", "emulated", "te"] = "auto",
        module_filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
        exclude: Optional[Sequence[str]] = DEFAULT_EXCLUDE,
        compute_dtype: Optional[Union[str, torch.dtype]] = None,
        dim_multiple: int = 16,
        amax_history_len: int = 16,
        margin: int = 0,
        grad_comm: Literal["fp8", "hp"] = "fp8",
        exp_avg_dtype: Literal["e4m3", "fp16", "fp32"] = "e4m3",
        exp_avg_sq_dtype: Literal["fp16", "fp32"] = "fp16",
        sqrt_exp_avg_sq: bool = False,
        master_weights: Literal["fp16", "fp16_scaled", "fp32"] = "fp16",
        checkpoint_format: Literal["native", "portable"] = "native",
        restore_layers: bool = True,
        log_fp8_stats: Literal["summary", "per_layer", "off"] = "summary",
    ) -> None:
        self.level = settings.check_level(level)
        self.backend = settings.check_backend(backend)
        self.module_filter_fn = settings.check_filter(module_filter_fn)
        self.exclude = settings.check_exclude(exclude)
        self.compute_dtype = settings.check_compute_dtype(compute_dtype)
        self.dim_multiple = settings.check_positive_int("dim_multiple", dim_multiple)
        self.amax_history_len = settings.check_positive_int("amax_history_len", amax_history_len)
        self.margin = settings.check_positive_int("margin", margin, minimum=0)
        self.grad_comm = settings.check_choice("grad_comm", grad_comm, settings.GRAD_COMMS)
        self.exp_avg_dtype, self.exp_avg_sq_dtype, self.master_weights = settings.check_optimizer_formats(
            exp_avg_dtype, exp_avg_sq_dtype, master_weights
        )
        self.sqrt_exp_avg_sq = bool(sqrt_exp_avg_sq)
        self.checkpoint_format = settings.check_choice("checkpoint_format", checkpoint_format,
                                                       settings.CHECKPOINT_FORMATS)
        self.restore_layers = settings.check_bool("restore_layers", restore_layers)
        self.log_fp8_stats = settings.check_choice("log_fp8_stats", log_fp8_stats, settings.STAT_MODES)
        self.skipped_steps = 0
        self.conversion_report: Optional[ConversionReport] = None
        self._module: Optional[nn.Module] = None
        self._registry: Optional[ScalingRegistry] = None
        self._fp8_weight_names: list[str] = []
        self._reduce_group: Any = None
        self._pending_state: Optional[dict[str, Any]] = None
        self._optimizers: list[Optimizer] = []  # set by the Trainer plugin's connect
        self._converted: list[nn.Module] = []  # the FP8 layers this plugin made (restore_module swaps them back)
        self._master_dtypes: list[tuple[torch.Tensor, torch.dtype]] = []  # O2 FP16 masters and their former dtype
        self._ddp_ignore_before: Optional[list[str]] = None
        # scaling states kept by restore_module, for the next conversion of the same model
        self._carried_state: Optional[tuple[weakref.ref, dict[str, Any]]] = None
        # FSDP2: the sharded layout, and per FP8 layer the weight's former dtype and requires_grad (restore_module)
        self._sharding: Optional[fsdp.ShardingInfo] = None
        self._sharded_layers: list[tuple[FP8Linear, torch.dtype, bool]] = []
        self.all_gather_stats = fsdp.AllGatherStats()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(level={self.level!r}, backend={self.backend!r})"

    @property
    def wgrad_mode(self) -> str:
        """How FP8Linear delivers weight gradients: ``"dequantized"`` (``.grad``) at O1, ``"fp8"`` at O2/O3."""
        return "fp8" if self.level in ("O2", "O3") else "dequantized"

    @property
    def registry(self) -> ScalingRegistry:
        """The scaling states of the converted model (after :meth:`convert_module`)."""
        if self._registry is None:
            raise RuntimeError(f"{type(self).__name__} has no converted model yet; call convert_module(model) first.")
        return self._registry

    # ------------------------------------------------------------------ conversion

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Swap eligible ``nn.Linear`` layers for ``FP8Linear`` in place (idempotent) and log the table.

        At O2 the FP8 layers' weights become the FP16 masters (before any DDP wrapping) and are kept
        out of DDP's own gradient reduction: their gradients stay FP8 and this plugin reduces them.
        """
        if module is self._module:
            # converted already (the user called this before ``Fabric.setup``, which calls it again)
            return module
        if self._convert_when_sharded and not fsdp.is_sharded(module):
            return module  # Fabric + ModelParallelStrategy: converted in place once parallelize_fn has sharded it
        if self._module is not None and not self._replaces_model:
            raise RuntimeError(
                f"{type(self).__name__} already converted a model ({type(self._module).__name__}) and tracks its "
                "FP8 scales; use one plugin instance per model."
            )
        sharding = fsdp.sharding_info(module)
        if sharding is None and self.level == "O3":
            raise ValueError(
                "MSAMPPrecision(level='O3') shards the FP8 weights, the FP16 masters and the Adam states, and needs a "
                "model sharded with FSDP2: use Trainer(strategy=ModelParallelStrategy(data_parallel_size=N, "
                "tensor_parallel_size=1)) and apply fully_shard in configure_model. Without sharding use level='O2' "
                "(single device or strategy='ddp')."
            )
        if sharding is not None and self.level != "O1" and self.master_weights == "fp16_scaled":
            raise ValueError(
                "master_weights='fp16_scaled' is not supported with sharded (FSDP2) parameters; allowed there: "
                "'fp16' (MS-AMP's FP16 master shards) or 'fp32'."
            )
        if sharding is not None and self.level == "O3":
            fsdp.check_fp8_all_gather(sharding)
        if sharding is not None and self.checkpoint_format == "portable":
            raise ValueError(
                "checkpoint_format='portable' converts full (unsharded) weights and optimizer states and is not "
                "supported with sharded (FSDP2) parameters; allowed there: 'native' (a sharded distributed "
                "checkpoint with the FP16 masters, the FP8/FP16 Adam states and the scales); "
                "lightning_plugins.precision.consolidate_sharded_checkpoint(folder, 'model.ckpt') turns that folder "
                "into the portable single file afterwards."
            )
        self._check_existing_layers(module)
        # the default patterns (even an unpickled copy) must not warn when they match nothing
        exclude = DEFAULT_EXCLUDE if tuple(self.exclude) == DEFAULT_EXCLUDE else self.exclude
        report = convert_to_fp8(
            module,
            self.module_filter_fn,
            exclude,
            dim_multiple=self.dim_multiple,
            backend=self.backend,
            amax_history_len=self.amax_history_len,
            margin=self.margin,
            wgrad_mode=self.wgrad_mode,
            log_table=False,
            in_place=sharding is not None,  # FSDP2 keeps references to the layer objects
        )
        rank_zero_info(f"{type(self).__name__}(level={self.level}): {report.table()}")
        self.conversion_report = report
        self._module = module
        self._converted = [module.get_submodule(d.name) for d in report.converted]
        self._registry = ScalingRegistry(module)
        weights = fp8_linear_weights(module)
        ids = {id(w) for w in weights}
        self._fp8_weight_names = [n for n, p in module.named_parameters(remove_duplicate=False) if id(p) in ids]
        self._master_dtypes = []
        self._ddp_ignore_before = None
        self._sharding, self._sharded_layers = sharding, []
        if sharding is not None:
            self._reduce_group = sharding.group if sharding.world_size > 1 else None
            if self.level != "O1":
                self._prepare_sharded(sharding)
        elif self.level == "O2":
            if self.master_weights == "fp16":
                for w in weights:
                    if w.dtype != torch.float16:
                        self._master_dtypes.append((w, w.dtype))
                        w.data = w.data.to(torch.float16)
            self._ddp_ignore_before = list(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
            _ignore_in_ddp(module, self._fp8_weight_names)
            _broadcast_from_rank0([w.data for w in weights])
        if sharding is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._reduce_group = dist.group.WORLD
        carried, self._carried_state = self._carried_state, None
        if self._pending_state is None and carried is not None and carried[0]() is module and carried[1]:
            # the same model again (after restore_module): continue the scales of the layers it still has
            self._registry.load_state_dict(carried[1]["scaling"], strict=False)
            self.skipped_steps = int(carried[1].get("skipped_steps", 0))
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)
        return module

    def _prepare_sharded(self, sharding: fsdp.ShardingInfo) -> None:
        """O2/O3 on FSDP2: FP16 master shards outside FSDP's gradient reduction; O3: the FP8 all-gather."""
        master = torch.float16 if self.master_weights == "fp16" else None
        for layer in self._converted:
            dtype, requires_grad = layer.weight.dtype, layer.weight.requires_grad
            fsdp.prepare_fp8_weight(sharding, layer, master)
            if self.level == "O3":
                fsdp.enable_fp8_all_gather(sharding, layer, self.all_gather_stats)
            self._sharded_layers.append((layer, dtype, requires_grad))
        fsdp.finish_fp8_weights(self._module, sharding, [layer for layer, _, _ in self._sharded_layers])
        ids = {id(w) for w in fp8_linear_weights(self._module)}
        self._fp8_weight_names = [n for n, p in self._module.named_parameters(remove_duplicate=False) if id(p) in ids]

    def restore_module(self) -> int:
        """Swap the FP8 layers this plugin converted back to their plain layers (``nn.Linear``/``Conv1D``).

        Weights go back to the dtype they had before (the O2 FP16 masters too: FP16 values are exact in fp32), FP8
        weight gradients are dropped, and DDP's ignore list is restored. The scaling states are kept by the plugin
        (and stay in :meth:`state_dict`), so converting the same model again continues them. Returns the number of
        layers swapped back (0 when nothing is converted).
        """
        module = self._module
        if module is None:
            return 0
        state = self.state_dict()
        if self._sharded_layers:
            fsdp.reshard_all(module)
        for layer, dtype, requires_grad in self._sharded_layers:
            fsdp.restore_fp8_weight(self._sharding, layer, dtype, requires_grad)
        if self._sharded_layers:
            fsdp.refresh_dtypes(self._sharding)
        restored = revert_fp8(module, self._converted)
        for weight, dtype in self._master_dtypes:
            if weight.dtype != dtype:
                weight.data = weight.data.to(dtype)
        if self._ddp_ignore_before is not None:
            module._ddp_params_and_buffers_to_ignore = self._ddp_ignore_before
        self._carried_state = (weakref.ref(module), state)
        self._module = None
        self._registry = None
        self._converted, self._master_dtypes, self._ddp_ignore_before = [], [], None
        self._sharding, self._sharded_layers = None, []
        return restored

    def fp8_statistics(self, saturation: Optional[SaturationCounter] = None, per_layer: bool = False) -> dict[str, Any]:
        """FP8 metrics of the converted model (device tensors, no host sync): see
        :func:`~lightning_plugins.precision.fp8_stats.fp8_statistics`. Empty before :meth:`convert_module`."""
        if self._registry is None:
            return {}
        return fp8_statistics(self._registry, self.skipped_steps, saturation, per_layer)

    def _check_existing_layers(self, module: nn.Module) -> None:
        wrong = [n for n, m in module.named_modules() if isinstance(m, FP8Linear) and m.wgrad_mode != self.wgrad_mode]
        if wrong:
            raise ValueError(
                f"Layers {wrong} are FP8Linear with a wgrad_mode other than {self.wgrad_mode!r}, which level "
                f"{self.level} needs; convert them with wgrad_mode={self.wgrad_mode!r} or leave them as nn.Linear."
            )

    def convert_optimizer(self, optimizer: Optimizer, model: nn.Module) -> Optimizer:
        """At O2/O3, the FP8 counterpart of a ``torch.optim.Adam``/``AdamW`` (same param groups); else ``optimizer``.

        The FP8Linear weights among its parameters become FP16 master weights; an optimizer that owns none (adapters
        trained over frozen FP8 layers, e.g. GS-LoRA's) gets FP8/FP16 moments only.

        Raises:
            TypeError: at O2/O3 for any other optimizer class.
            ValueError: for an unsupported Adam option (amsgrad, fused, foreach, capturable, differentiable).
        """
        if self.level == "O1" or isinstance(optimizer, _FP8AdamBase):
            return optimizer
        if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
            raise TypeError(
                f"MSAMPPrecision(level={self.level!r}) keeps Adam's moments in FP8/FP16 and needs torch.optim.Adam or "
                f"torch.optim.AdamW, got {type(optimizer).__module__}.{type(optimizer).__qualname__}. "
                "Return Adam/AdamW "
                "from configure_optimizers, or use level='O1' (FP8 compute and communication, any optimizer)."
            )
        # An optimizer of adapters over frozen FP8 layers (e.g. LoRA) owns no FP8 weight: FP8 moments, no masters.
        fp8_weights = {id(w) for w in fp8_linear_weights(model)}
        owns_fp8_weight = any(id(p) in fp8_weights for group in optimizer.param_groups for p in group["params"])
        return from_optimizer(
            optimizer,
            model=model if owns_fp8_weight else None,
            exp_avg_dtype=self.exp_avg_dtype,
            exp_avg_sq_dtype=self.exp_avg_sq_dtype,
            sqrt_exp_avg_sq=self.sqrt_exp_avg_sq,
            master_weights=self.master_weights if owns_fp8_weight else "fp32",
        )

    # ------------------------------------------------------------------ contexts

    def _autocast_targets(self) -> list[tuple[str, torch.dtype]]:
        cuda = torch.cuda.is_available()
        if self.compute_dtype is None:
            return [("cuda", torch.bfloat16)] if cuda else []
        if self.compute_dtype == torch.float32:
            return []
        return [("cpu", self.compute_dtype)] + ([("cuda", self.compute_dtype)] if cuda else [])

    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        """Autocast to ``compute_dtype`` for the non-FP8 ops (FP8Linear handles its own casts)."""
        with contextlib.ExitStack() as stack:
            for device_type, dtype in self._autocast_targets():
                stack.enter_context(torch.autocast(device_type, dtype=dtype))
            yield

    @contextlib.contextmanager
    def eval_context(self) -> Generator[None, None, None]:
        """Forward context for evaluation: FP8 casts record nothing, so the amax history only sees training."""
        with frozen_scaling(), self.forward_context():
            yield

    # ------------------------------------------------------------------ gradients and the step

    def _fp8_weight_params(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self._module is None or self.level == "O1":
            return []
        ids = {id(w) for w in fp8_linear_weights(self._module)}
        return [p for p in params if id(p) in ids]

    def _world(self) -> int:
        return dist.get_world_size(self._reduce_group) if self._reduce_group is not None else 1

    @torch.no_grad()
    def reduce_fp8_grads(self, params: Iterable[torch.Tensor]) -> None:
        """Average the FP8 side-channel weight gradients over the data-parallel ranks (O2 with DDP).

        A no-op on one process. Every rank must call it with the same parameters; a parameter without
        a gradient on some rank takes part with zeros there if any rank has one.
        """
        if self._sharding is not None:
            if self.level != "O1":
                layers = [layer for layer, _, _ in self._sharded_layers if layer.wgrad_without_requires_grad]
                fsdp.reduce_scatter_fp8_grads(self._sharding, layers, self.grad_comm)
            return
        if self._world() == 1:
            return
        weights = self._fp8_weight_params(list(params))
        if not weights:
            return
        device = weights[0].device
        has = torch.tensor([float(get_fp8_grad(w) is not None) for w in weights], device=device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX, group=self._reduce_group)
        active = [w for w, h in zip(weights, has.tolist()) if h > 0]
        inputs = [_zero_fp8(w) if get_fp8_grad(w) is None else get_fp8_grad(w) for w in active]
        if self.grad_comm == "fp8":
            reduced, _ = fp8_all_reduce(inputs, self._reduce_group, average=True)
        else:
            reduced = _hp_all_reduce(inputs, self._reduce_group)
        for w, r in zip(active, reduced):
            set_fp8_grad(w, r)

    def _found_nonfinite(self, params: Sequence[torch.Tensor]) -> bool:
        flag = fsdp.sharded_grads_nonfinite(params) if self._sharding is not None else grads.grads_nonfinite(params)
        if self._registry is not None:
            flag = flag | self._registry.found_nonfinite().to(flag.device)
        if self._world() > 1:
            device = params[0].device if params else flag.device
            as_float = flag.to(device=device, dtype=torch.float32)
            dist.all_reduce(as_float, op=dist.ReduceOp.MAX, group=self._reduce_group)
            return bool(as_float > 0)
        return bool(flag)

    def _step_or_skip(self, optimizer: Optimizer, found_nonfinite: bool, **kwargs: Any) -> Any:
        """``optimizer.step()`` if the gradients are finite, else skip it and drop them; then the scaling update."""
        result = None
        if found_nonfinite:
            self.skipped_steps += 1
            layers = self._registry.nonfinite_layers() if self._registry is not None else []
            _warn_rank_zero(
                f"{type(self).__name__}: inf/NaN gradients, optimizer step skipped ({self.skipped_steps} skipped so "
                f"far); FP8 states that saw them: {layers or 'none (high-precision gradients)'}. Their scales restart "
                "with just-in-time scaling."
            )
            optimizer.zero_grad(set_to_none=True)
            clear_fp8_grads(p for g in optimizer.param_groups for p in g["params"])
        else:
            result = optimizer.step(**kwargs)
        self._update_scaling()
        return result

    def _update_scaling(self) -> None:
        """The delayed-scaling update; sharded, after agreeing on every amax, so that all ranks hold the same scales."""
        if self._registry is None:
            return
        if self._sharding is not None and self._reduce_group is not None:
            # O3: the same collective agrees on the updated weights' amaxes for the next step's FP8 all-gathers
            gathered = [layer for layer, _, _ in self._sharded_layers] if self.level == "O3" else []
            fsdp.all_reduce_amaxes(list(self._registry.states().values()), self._reduce_group, self._sharding,
                                   gathered)
        self._registry.update()

    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        """Fabric: reduce FP8 gradients, then step, or skip the step on inf/NaN gradients."""
        params = list(self.main_params(optimizer))
        self.reduce_fp8_grads(params)
        return self._step_or_skip(optimizer, self._found_nonfinite(params), **kwargs)

    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: Union[int, float], norm_type: float = 2.0) -> Any:
        """Clip the total norm of ``.grad`` and FP8 gradients (FP8 ones through their scale); returns the norm.
        Sharded (FSDP2): the norm of the whole gradient, over every rank's shard."""
        if self._sharding is not None:
            group = self._reduce_group or self._sharding.group
            return fsdp.sharded_clip_grad_norm_(self.main_params(optimizer), clip_val, norm_type, group)
        return grads.clip_grad_norm_(self.main_params(optimizer), clip_val, norm_type)

    def clip_grad_by_value(self, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
        """Clamp ``.grad`` and FP8 gradients elementwise to ``[-clip_val, clip_val]``."""
        if self._sharding is not None:
            fsdp.sharded_clip_grad_value_(self.main_params(optimizer), clip_val)
        else:
            grads.clip_grad_value_(self.main_params(optimizer), clip_val)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Scaling states (amax histories, scales, warm-up counters), the level and the skip counter."""
        if self._registry is None:
            # after restore_module: what the next conversion will continue from
            return dict(self._carried_state[1]) if self._carried_state is not None else {}
        return {
            "format_version": _STATE_VERSION,
            "level": self.level,
            "skipped_steps": self.skipped_steps,
            "fp8_weights": list(self._fp8_weight_names),
            "checkpoint_format": self.checkpoint_format,
            "scaling": self._registry.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; before :meth:`convert_module` it is kept and applied at conversion."""
        if not state_dict:
            return
        version = state_dict.get("format_version")
        if version != _STATE_VERSION or "scaling" not in state_dict:
            raise ValueError(
                f"Unsupported {type(self).__name__} state (format_version={version!r}); this version reads "
                f"{_STATE_VERSION}. Was the checkpoint written by another plugin?"
            )
        if self._registry is None:
            self._pending_state = state_dict
            return
        if state_dict.get("level") != self.level:
            rank_zero_info(
                f"{type(self).__name__}: the checkpoint was written at level {state_dict.get('level')}, resuming at "
                f"{self.level}; the FP8 scales carry over."
            )
        self._registry.load_state_dict(state_dict["scaling"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))


# ---------------------------------------------------------------------- helpers


def _ignore_in_ddp(module: nn.Module, names: Sequence[str]) -> None:
    # DDP would all-reduce zeros for parameters whose gradient lives in the FP8 side channel.
    existing = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        module, sorted(existing | set(names))
    )


def _broadcast_from_rank0(tensors: Sequence[torch.Tensor]) -> None:
    """DDP does not broadcast ignored parameters: make the FP8 weights equal on all ranks ourselves."""
    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    needs_cuda = dist.get_backend() == "nccl"
    for t in tensors:
        if needs_cuda and t.device.type != "cuda":
            staged = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.broadcast(staged, src=0)
            t.copy_(staged.to(t.device))
        else:
            dist.broadcast(t, src=0)


def _zero_fp8(weight: torch.Tensor) -> ScaledTensor:
    data = torch.zeros(weight.shape, dtype=_WGRAD_DTYPE, device=weight.device)
    return ScaledTensor(data, torch.ones((), dtype=torch.float32, device=weight.device))


def _hp_all_reduce(inputs: Sequence[ScaledTensor], group: Any) -> list[ScaledTensor]:
    """Average FP8 gradients in fp32 (``grad_comm="hp"``) and store the result in E4M3 again."""
    flat = torch.cat([g.dequantize(torch.float32).reshape(-1) for g in inputs])
    dist.all_reduce(flat, group=group)
    flat.div_(dist.get_world_size(group))
    out, start = [], 0
    for g in inputs:
        n = g.data.numel()
        q, bad = quantize(flat[start : start + n].view(g.data.shape), g.fmt)
        out.append(ScaledTensor(q.data, torch.where(bad, torch.full_like(q.scale_inv, float("nan")), q.scale_inv)))
        start += n
    return out


@rank_zero_only
def _warn_rank_zero(message: str) -> None:
    log.warning(message)
