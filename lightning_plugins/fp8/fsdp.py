"""FP8 training of models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``), pure torch.

How the pieces meet FSDP2 (which remembers, at ``fully_shard`` time, the module object and attribute name of every
parameter and sets the gathered parameter onto that object in each forward):

* **conversion**: the ``nn.Linear`` objects are turned into :class:`~lightning_plugins.fp8.FP8Linear` in place
  (``convert_to_fp8(..., in_place=True)``: a class swap), so FSDP's references stay valid.
* **masters** (O2/O3): :func:`prepare_fp8_weight` re-types the FP8 layers' weight shards to FP16 (FSDP's padded
  shard storage included). FSDP requires one dtype for the trainable parameters of a group when it initialises
  (lazily), so :func:`finish_fp8_weights` runs that initialisation while these weights have
  ``requires_grad=False``, then makes them trainable again. Their ``.grad`` stays ``None``: the layer computes
  their gradient into its E4M3 gradient slot, so FSDP does not reduce them;
  :func:`reduce_scatter_fp8_grads` does, as E4M3 bytes with one scale per tensor (``all_to_all`` of each rank's
  rows, summed in fp32 by the receiving rank), and leaves each rank's averaged shard as an E4M3 side-channel
  gradient on the sharded parameter, where the FP8 optimizers read it (they work on the local shards).
* **FP8 all-gather** (O3, :func:`enable_fp8_all_gather`): the shard's local tensor gets FSDP2's all-gather
  extension (``fsdp_pre_all_gather``/``fsdp_post_all_gather``). The ranks agree on the weight's amax, every rank
  casts its FP16 shard to E4M3 with that scale, and the gather moves 1 byte per element (as ``uint8``, which gloo
  and NCCL accept). The gathered parameter is the E4M3 tensor itself; its scale is left on the layer
  (``fp8_gathered_scale_inv``), and FP8Linear uses both as they are.
  The weight amaxes of all layers are agreed in the one collective of :func:`all_reduce_amaxes` after each optimizer
  step and kept on the layers for the training-mode gathers until the next step (forward, backward re-gather,
  accumulated micro-batches); the first step and every eval-mode gather (validation, where a callback may have
  swapped the weights) agree on their amax right before the gather (one scalar ``all_reduce`` each).
* **agreement**: :func:`all_reduce_amaxes` makes the newest amax of every scaling state the maximum over the ranks
  before the delayed-scaling update, so every rank holds identical scales and histories; an inf/NaN anywhere is
  seen everywhere.

Supported: FSDP2 over one data-parallel mesh dimension, parameters sharded on dim 0 (the default). Tensor
parallelism and other placements are refused with an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_plugins.fp8.formats import get_format
from lightning_plugins.fp8.linear import FP8Linear
from lightning_plugins.fp8.quantize import ScaledTensor, quantize, tensor_amax, to_float32
from lightning_plugins.fp8.scaling import ScalingState, scaling_frozen
from lightning_plugins.fp8.wgrad import get_fp8_grad

__all__ = [
    "ShardingInfo",
    "sharding_info",
    "is_sharded",
    "local_tensor",
    "prepare_fp8_weight",
    "finish_fp8_weights",
    "restore_fp8_weight",
    "reshard_all",
    "refresh_dtypes",
    "enable_fp8_all_gather",
    "check_fp8_all_gather",
    "AllGatherStats",
    "reduce_scatter_fp8_grads",
    "all_reduce_amaxes",
    "sharded_grads_nonfinite",
    "sharded_clip_grad_norm_",
    "sharded_clip_grad_value_",
]

_E4M3 = get_format("e4m3")
_FP8_GRAD_ATTR = "_fp8_grad"  # the side-channel attribute of lightning_plugins.fp8.wgrad
_NAN = float("nan")
_AGREED_AMAX_ATTR = "fp8_agreed_weight_amax"  # on an O3 layer: its weight amax over the ranks, since the last step


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def is_sharded(module: nn.Module) -> bool:
    """Does ``module`` hold DTensor (sharded) parameters?"""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in module.parameters())


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (sharing its storage), or ``t`` itself."""
    dtensor = _dtensor_type()
    return t._local_tensor if dtensor is not None and isinstance(t, dtensor) else t


@dataclass
class ShardingInfo:
    """The FSDP2 layout of a model: its data-parallel process group and the ``FSDPParam`` of every parameter."""

    group: Any
    world_size: int
    rank: int
    fsdp_params: dict[int, Any] = field(default_factory=dict)  # id(sharded parameter at discovery) -> FSDPParam
    param_groups: dict[int, Any] = field(default_factory=dict)  # id(FSDPParam) -> FSDPParamGroup
    owners: dict[tuple[int, str], Any] = field(default_factory=dict)  # (id(module), attribute) -> FSDPParam

    def fsdp_param(self, layer: nn.Module, name: str = "weight") -> Any:
        """The ``FSDPParam`` that manages ``layer.<name>`` (FSDP re-sets that attribute; the object may change)."""
        return self.owners[(id(layer), name)]


def _unsupported(reason: str) -> ValueError:
    return ValueError(
        f"FP8 training with sharded parameters supports FSDP2 (fully_shard) over one data-parallel mesh dimension "
        f"with parameters sharded on dim 0 (Lightning: ModelParallelStrategy(data_parallel_size=N, "
        f"tensor_parallel_size=1)); {reason}."
    )


def sharding_info(module: nn.Module) -> ShardingInfo | None:
    """The FSDP2 layout of ``module``, or ``None`` when it has no sharded parameters.

    Raises:
        ValueError: for a layout this module cannot train in FP8 (tensor parallelism, a 2-D mesh, a placement
            other than ``Shard(0)``, DTensors not managed by ``fully_shard``, or a mix of sharded and plain
            parameters).
    """
    dtensor = _dtensor_type()
    if dtensor is None:
        return None
    named = list(module.named_parameters())
    sharded = [(n, p) for n, p in named if isinstance(p, dtensor)]
    if not sharded:
        return None
    plain = [n for n, p in named if not isinstance(p, dtensor)]
    if plain:
        raise _unsupported(f"parameters {plain[:5]} are not sharded: apply fully_shard to the root module as well")
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import Shard

    info: ShardingInfo | None = None
    for mod in module.modules():
        if not isinstance(mod, FSDPModule):
            continue
        for group in mod._get_fsdp_state()._fsdp_param_groups:
            for fp in group.fsdp_params:
                if info is None:
                    mesh = fp.mesh_info.mesh
                    pg = mesh.get_group()
                    info = ShardingInfo(pg, dist.get_world_size(pg), dist.get_rank(pg))
                info.fsdp_params[id(fp.sharded_param)] = fp
                info.param_groups[id(fp)] = group
                info.owners[(id(fp._module_info.module), fp._module_info.param_name)] = fp
    for name, p in sharded:
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise _unsupported(
                f"parameter {name!r} is placed as {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh (tensor "
                "parallelism?)"
            )
        if info is None or id(p) not in info.fsdp_params:
            raise _unsupported(f"parameter {name!r} is a DTensor that fully_shard does not manage")
    return info


def _reset_gathered(fp: Any) -> None:
    """Forget FSDP's gathered buffers of ``fp`` so that the next all-gather builds them for the new shard."""
    if hasattr(fp, "_unsharded_param"):
        del fp._unsharded_param
    fp.all_gather_outputs = []
    fp._unsharded_inner_tensors = []


@torch.no_grad()
def _retype_shard(fp: Any, dtype: torch.dtype, requires_grad: bool) -> nn.Parameter:
    from torch.distributed.tensor import DTensor

    old = fp.sharded_param
    if fp.fsdp_placement.dim != 0:
        raise _unsupported(f"a parameter is sharded on dim {fp.fsdp_placement.dim}")
    if old.dtype != dtype:
        padded = fp._sharded_param_data.to(dtype)
        fp._sharded_param_data = padded
        local = padded.view(fp.padded_sharded_param_size).narrow(0, 0, old._local_tensor.size(0))
        new = DTensor.from_local(
            local, old.device_mesh, old.placements, run_check=False, shape=old.shape, stride=old.stride()
        )
        # the same parameter object (an optimizer or a checkpoint may hold it), re-typed: the tensor metadata
        # through .data, DTensor's own fields by hand
        old.data = new
        old._local_tensor = new._local_tensor
        old._spec = new._spec
        fp.reset_sharded_param()
        _reset_gathered(fp)
    old.requires_grad_(requires_grad)
    return old


def _refresh_dtypes(info: ShardingInfo, fps: Iterable[Any]) -> None:
    for group in {id(info.param_groups[id(fp)]): info.param_groups[id(fp)] for fp in fps}.values():
        group._init_mp_dtypes()


def prepare_fp8_weight(info: ShardingInfo, layer: FP8Linear, master_dtype: torch.dtype | None) -> nn.Parameter:
    """O2/O3: the sharded weight of ``layer`` becomes a master shard of ``master_dtype`` (``None``: unchanged),
    registered with ``requires_grad=False`` until :func:`finish_fp8_weights`; a trainable weight keeps getting its
    FP8 gradient (``wgrad_without_requires_grad``). The parameter object stays the same; it is returned."""
    fp = info.fsdp_param(layer)
    trainable = layer.weight.requires_grad
    new = _retype_shard(fp, master_dtype or layer.weight.dtype, requires_grad=False)
    layer.wgrad_without_requires_grad = trainable
    return new


def finish_fp8_weights(module: nn.Module, info: ShardingInfo, layers: Sequence[FP8Linear]) -> None:
    """After :func:`prepare_fp8_weight` (and :func:`enable_fp8_all_gather`) for every FP8 layer: FSDP's lazy
    initialisation runs now, while the FP8 masters have ``requires_grad=False`` (it wants one dtype for a group's
    trainable parameters and fixes its dtypes once, here), then the trainable ones get ``requires_grad=True``
    back (what optimizers, ``requires_grad`` filters and distributed checkpoints look at). Their ``.grad`` stays
    ``None``: the FP8 gradient goes to the layer's slot, so FSDP never reduces them."""
    from torch.distributed.fsdp import FSDPModule

    def roots(mod: nn.Module) -> list[nn.Module]:
        if isinstance(mod, FSDPModule):
            return [mod]
        return [r for child in mod.children() for r in roots(child)]

    for root in roots(module):
        root._get_fsdp_state()._lazy_init()
    _refresh_dtypes(info, info.fsdp_params.values())  # when FSDP was initialised before (a second conversion)
    for layer in layers:
        if layer.wgrad_without_requires_grad:
            info.fsdp_param(layer).sharded_param.requires_grad_(True)


def reshard_all(module: nn.Module) -> None:
    """Put every FSDP2 unit of ``module`` back in its sharded state (a root unit stays gathered after a forward
    without backward, e.g. a last validation step)."""
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def restore_fp8_weight(info: ShardingInfo, layer: FP8Linear, dtype: torch.dtype, requires_grad: bool) -> None:
    """Undo :func:`prepare_fp8_weight` (and :func:`enable_fp8_all_gather`): the shard back in ``dtype``, trainable
    through FSDP again; call :func:`refresh_dtypes` once all layers are restored."""
    fp = info.fsdp_param(layer)
    if isinstance(fp, _FP8AllGatherParam):
        fp.__class__ = next(c for c in type(fp).__mro__[1:] if c is not _FP8AllGatherParam)
        del fp._fp8_all_gather_fns
    local = fp.sharded_param._local_tensor
    for attr in ("fsdp_pre_all_gather", "fsdp_post_all_gather"):
        local.__dict__.pop(attr, None)
    _retype_shard(fp, dtype, requires_grad)
    fp._init_extensions()
    _reset_gathered(fp)
    layer.__dict__.pop("wgrad_without_requires_grad", None)
    layer.__dict__.pop("fp8_gathered_scale_inv", None)
    layer.__dict__.pop(_AGREED_AMAX_ATTR, None)


def refresh_dtypes(info: ShardingInfo) -> None:
    """Let FSDP re-read the parameter dtypes (after :func:`restore_fp8_weight` of every FP8 layer)."""
    _refresh_dtypes(info, info.fsdp_params.values())


@dataclass
class AllGatherStats:
    """What the FP8 all-gathers of one run moved: payload bytes and elements sent by this rank, and their dtypes."""

    bytes_sent: int = 0
    elements_sent: int = 0
    dtypes: set = field(default_factory=set)
    amax_all_reduces: int = 0  # gathers that had to agree on their amax themselves (no amax kept from the last step)


def check_fp8_all_gather(info: ShardingInfo, fsdp_params: Iterable[Any] | None = None) -> None:
    """Raise a ValueError if FSDP could not gather these parameters (default: all) in FP8."""
    for fp in info.fsdp_params.values() if fsdp_params is None else fsdp_params:
        post_forward = fp.post_forward_mesh_info  # True: the same mesh (back to the shard); False: None
        if post_forward is not None and post_forward != fp.mesh_info:
            raise ValueError(
                "The FP8 all-gather (level O3) does not support fully_shard(..., reshard_after_forward=<int>) (FSDP "
                "keeps a second, smaller shard after forward, which it cannot re-gather in FP8); use "
                "reshard_after_forward=True or False, or level='O2'."
            )


def enable_fp8_all_gather(info: ShardingInfo, layer: FP8Linear, stats: AllGatherStats | None = None) -> None:
    """O3: FSDP2 all-gathers ``layer``'s weight as E4M3 bytes with one scale every rank agrees on (see the module
    docstring). Call after :func:`prepare_fp8_weight`, before the first forward."""
    fp = info.fsdp_param(layer)
    check_fp8_all_gather(info, [fp])
    layer.fp8_gathered_scale_inv = torch.ones((), dtype=torch.float32, device=fp.sharded_param.device)
    state: ScalingState = layer.weight_scaling

    def fsdp_pre_all_gather(mesh: Any, outer_size: Any, outer_stride: Any, module: Any, mp_policy: Any) -> Any:
        shard = _padded_shard(fp)
        amax = layer.__dict__.get(_AGREED_AMAX_ATTR)
        if amax is None or not layer.training:  # first step or an eval gather: agree now (so does every rank)
            amax = _finite_or_inf(tensor_amax(shard))
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group())
            if stats is not None:
                stats.amax_all_reduces += 1
        record = layer.training and torch.is_grad_enabled() and not scaling_frozen()
        scale = state.scale_for(amax, record=record)  # weights: history 1, just-in-time from the global amax
        data = (to_float32(shard) * scale).clamp_(-_E4M3.max, _E4M3.max).to(_E4M3.dtype)
        scale_inv = torch.where(torch.isfinite(amax), torch.reciprocal(scale), torch.full_like(scale, _NAN))
        layer.fp8_gathered_scale_inv = scale_inv
        payload = data.view(torch.uint8)
        if stats is not None:
            stats.bytes_sent += payload.numel() * payload.element_size()
            stats.elements_sent += payload.numel()
            stats.dtypes.add(str(payload.dtype).replace("torch.", ""))
        return (payload,), None

    def fsdp_post_all_gather(
        all_gather_outputs: Sequence[torch.Tensor], metadata: Any, param_dtype: torch.dtype, *, out: Any = None
    ) -> Any:
        if out is not None:  # later gathers land in the same storage; the scale is on the layer
            return None
        (data,) = all_gather_outputs
        return data.view(_E4M3.dtype), ()

    fp._fp8_all_gather_fns = (fsdp_pre_all_gather, fsdp_post_all_gather)
    if not isinstance(fp, _FP8AllGatherParam):
        fp.__class__ = _fp8_param_class(type(fp))
    fp._init_extensions()
    _reset_gathered(fp)


_FP8_PARAM_CLASSES: dict[type, type] = {}


class _FP8AllGatherParam:
    """Mixin for an ``FSDPParam`` whose local shard carries the FP8 all-gather extension. FSDP looks the extension
    up on ``sharded_param._local_tensor``, which ``module.to()``/``_apply`` may replace: it is re-attached to
    whatever tensor that is whenever FSDP asks for it."""

    @property
    def _sharded_local_tensor(self) -> torch.Tensor:
        local = self.sharded_param._local_tensor
        pre, post = self._fp8_all_gather_fns
        if local.__dict__.get("fsdp_pre_all_gather") is not pre:
            local.fsdp_pre_all_gather = pre
            local.fsdp_post_all_gather = post
        return local


def _fp8_param_class(base: type) -> type:
    if base not in _FP8_PARAM_CLASSES:
        _FP8_PARAM_CLASSES[base] = type(f"FP8AllGather{base.__name__}", (_FP8AllGatherParam, base), {})
    return _FP8_PARAM_CLASSES[base]


def _padded_rows(fp: Any) -> int:
    return int(fp.padded_sharded_param_size[0])


@torch.no_grad()
def reduce_scatter_fp8_grads(
    info: ShardingInfo, layers: Sequence[FP8Linear], comm: str = "fp8", free_slots: bool = True
) -> int:
    """Average the full-size E4M3 weight gradients in the layers' slots over the ranks and give every rank its
    dim-0 shard, as an E4M3 side-channel gradient on the sharded weight (``comm="fp8"``: 1 byte per element and
    one scale per tensor travel; ``"hp"``: fp32). Every rank must call it with the same layers. A layer that no
    rank has a gradient for gets none. A NaN scale (a non-finite gradient) on any rank makes the result NaN on
    every rank. ``free_slots`` releases the slots' storage until the next backward. Returns the payload bytes
    this rank sent."""
    if not layers:
        return 0
    world, group = info.world_size, info.group
    fps = [info.fsdp_param(layer) for layer in layers]
    slots = [layer.wgrad_slot for layer in layers]
    for layer, slot in zip(layers, slots):
        if slot is None:
            raise RuntimeError(f"{type(layer).__name__} has no FP8 gradient slot (wgrad_mode={layer.wgrad_mode!r}).")
    device = slots[0].scale_inv.device
    scale_invs = torch.stack([s.scale_inv for s in slots])
    if any(s.data.untyped_storage().size() == 0 for s in slots):  # a layer with no backward since the last step
        scale_invs = torch.stack([
            s.scale_inv if s.data.untyped_storage().size() else torch.zeros_like(s.scale_inv) for s in slots
        ])
    sends = []
    for fp, slot, sinv in zip(fps, slots, scale_invs.unbind(0)):
        rows = _padded_rows(fp) * world
        full = slot.data if slot.data.untyped_storage().size() else torch.zeros_like(slot.data)
        if comm == "fp8":
            payload = full.view(torch.uint8)
        else:
            payload = to_float32(full) * sinv
        if payload.shape[0] != rows:
            padded = payload.new_zeros((rows, *payload.shape[1:]))
            padded[: payload.shape[0]] = payload
            payload = padded
        sends.append(payload.reshape(world, -1))
    send = torch.cat(sends, dim=1).reshape(-1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    gathered = torch.empty((world, len(layers)), dtype=torch.float32, device=device)
    _all_gather_flat(gathered.view(-1), scale_invs.to(torch.float32).contiguous(), group)
    has_any = (gathered != 0).any(dim=0).tolist()
    recv = recv.view(world, -1)
    offset = 0
    for i, (fp, layer) in enumerate(zip(fps, layers)):
        numel = sends[i].shape[1]
        part = recv[:, offset : offset + numel]
        offset += numel
        if not has_any[i]:
            continue
        if comm == "fp8":
            values = to_float32(part.view(_E4M3.dtype)) * gathered[:, i : i + 1]
        else:
            values = part
            values = torch.where(torch.isnan(gathered[:, i : i + 1]), torch.full_like(values, _NAN), values)
        mean = values.sum(dim=0).div_(world).view(_padded_rows(fp), *fp.sharded_param.shape[1:])
        mean = mean.narrow(0, 0, fp.sharded_param._local_tensor.size(0))
        q, bad = quantize(mean, "e4m3")
        q.scale_inv = torch.where(bad, torch.full_like(q.scale_inv, _NAN), q.scale_inv)
        setattr(fp.sharded_param, _FP8_GRAD_ATTR, q)
    for fp, slot in zip(fps, slots):
        slot.scale_inv.zero_()
        unsharded = getattr(fp, "_unsharded_param", None)
        if unsharded is not None and getattr(unsharded, _FP8_GRAD_ATTR, None) is not None:
            setattr(unsharded, _FP8_GRAD_ATTR, None)
        if free_slots and slot.data.untyped_storage().size():
            slot.data.untyped_storage().resize_(0)
    return send.numel() * send.element_size()


def _all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group: Any) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.14
    gather(out, inp, group=group)


def _padded_shard(fp: Any) -> torch.Tensor:
    return fp._sharded_param_data.view(fp.padded_sharded_param_size)  # zero rows pad an uneven last shard


def _finite_or_inf(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(amax), amax, torch.full_like(amax, float("inf")))  # MAX keeps an inf/NaN


@torch.no_grad()
def all_reduce_amaxes(states: Sequence[ScalingState], group: Any, info: ShardingInfo | None = None,
                      gathered_layers: Sequence[FP8Linear] = ()) -> None:
    """Make every state's newest amax (history slot 0) and its inf/NaN count the maximum over the ranks, so that the
    next :func:`~lightning_plugins.fp8.update_scaling_states` gives identical scales on every rank. One collective.

    With ``gathered_layers`` (O3, after the optimizer step), the same collective agrees on each layer's weight amax
    over the ranks' shards; the layer keeps it for its training-mode FP8 all-gathers until the next call."""
    if not states and not gathered_layers:
        return
    amaxes = [s.amax_history[0].to(torch.float32) for s in states]
    amaxes += [tensor_amax(_padded_shard(info.fsdp_param(layer))).to(torch.float32) for layer in gathered_layers]
    amaxes = _finite_or_inf(torch.stack(amaxes))
    counts = [s.nonfinite_count.to(device=amaxes.device, dtype=torch.float32) for s in states]
    buf = torch.cat([amaxes, torch.stack(counts)]) if counts else amaxes
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
    n_states, n_amaxes = len(states), len(amaxes)
    for layer, amax in zip(gathered_layers, buf[n_states:n_amaxes].unbind(0)):
        layer.__dict__[_AGREED_AMAX_ATTR] = amax.clone()
    if not states:
        return
    newest, counts = buf[:n_states], buf[n_amaxes:]
    newest = torch.where(counts > 0, torch.full_like(newest, _NAN), newest)
    torch._foreach_copy_([s.amax_history[0] for s in states], list(newest.unbind(0)))
    torch._foreach_copy_([s.nonfinite_count for s in states], list(counts.to(torch.int32).unbind(0)))


def _split_local(params: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, ScaledTensor]]]:
    seen: set[int] = set()
    hp, fp8 = [], []
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.grad is not None:
            hp.append(local_tensor(p.grad))
        g = get_fp8_grad(p)
        if g is not None:
            fp8.append((p, g))
    return hp, fp8


def sharded_grads_nonfinite(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Bool 0-d: does this rank's shard of any gradient (``.grad`` or FP8) hold inf/NaN? (reduce it over ranks)"""
    hp, fp8 = _split_local(params)
    flags = [(~torch.isfinite(g)).any() for g in hp] + [~torch.isfinite(g.scale_inv) for _, g in fp8]
    if not flags:
        return torch.zeros((), dtype=torch.bool)
    device = flags[0].device  # one stack per device, no host sync
    return torch.stack([f.to(device) for f in flags]).any()


@torch.no_grad()
def sharded_clip_grad_norm_(
    params: Iterable[torch.Tensor], max_norm: float, norm_type: float, group: Any
) -> torch.Tensor:
    """``clip_grad_norm_`` over sharded gradients: the norm of the whole (global) gradient, from every rank's
    shard (one ``all_reduce``); returns it (before clipping)."""
    norm_type = float(norm_type)
    hp, fp8 = _split_local(params)
    parts = [to_float32(g).abs() for g in hp] + [to_float32(g.data).abs() * g.scale_inv.abs() for _, g in fp8]
    if norm_type == float("inf"):
        local = torch.stack([t.max() if t.numel() else torch.zeros(()) for t in parts]).max() if parts else None
        total = local if local is not None else torch.zeros(())
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=group)
    else:
        total = torch.stack([t.pow(norm_type).sum() for t in parts]).sum() if parts else torch.zeros(())
        dist.all_reduce(total, group=group)
        total = total.pow(1.0 / norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in hp:
        g.mul_(coef.to(g.dtype))
    for p, g in fp8:
        setattr(p, _FP8_GRAD_ATTR, ScaledTensor(g.data, g.scale_inv * coef))
    return total


@torch.no_grad()
def sharded_clip_grad_value_(params: Iterable[torch.Tensor], clip_value: float) -> None:
    """``clip_grad_value_`` over the local shards (elementwise, so no communication)."""
    clip_value = float(clip_value)
    hp, fp8 = _split_local(params)
    for g in hp:
        g.clamp_(-clip_value, clip_value)
    for p, g in fp8:
        q, bad = quantize(g.dequantize(torch.float32).clamp_(-clip_value, clip_value), g.fmt)
        bad = bad | ~torch.isfinite(g.scale_inv)
        setattr(p, _FP8_GRAD_ATTR, ScaledTensor(q.data, torch.where(bad, torch.full_like(q.scale_inv, _NAN),
                                                                     q.scale_inv)))
