"""FP8 gradient all-reduce on stock collectives (NCCL and gloo): no custom NCCL needed.

Neither NCCL nor gloo can add FP8 numbers, so the sum is done by the ranks themselves, in fp32,
in the shape of a reduce-scatter + all-gather (the bytes per rank of a ring all-reduce):

1. every rank holds per-tensor scaled FP8 values (a flat ``uint8`` payload and one fp32
   ``scale_inv`` per tensor); the scales are all-gathered (a few bytes per tensor);
2. ``all_to_all_single`` sends chunk ``j`` of the payload to rank ``j``;
3. each rank dequantizes the N copies of its chunk with their senders' scales and sums them in
   fp32 (no overflow, no shared-minimum-scale precision loss, so MS-AMP's pre-scaling factor is
   not needed);
4. one ``all_reduce(MAX)`` of the per-tensor amax of the summed chunks gives a shared power-of-two
   scale per tensor; each rank quantizes its chunk with it and ``all_gather`` returns the full
   payload, bit-identical on every rank.

Non-finite values: a tensor whose ``scale_inv`` is NaN (how :class:`~lightning_plugins.fp8.FP8Linear`
flags an inf/NaN gradient) or whose values are inf/NaN comes back with a NaN ``scale_inv`` on every
rank, so every rank takes the same skip decision.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at runtime.
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lightning_plugins.fp8.formats import FloatFormat, get_format
from lightning_plugins.fp8.quantize import ScaledTensor, quantize, to_float32
from lightning_plugins.fp8.scaling import pow2_scale

__all__ = [
    "fp8_all_reduce",
    "fp8_all_reduce_",
    "FP8CommHookState",
    "fp8_comm_hook",
    "register_fp8_comm_hook",
]

_FP8_FORMATS = ("e4m3", "e5m2")


def _world_size(group: Any) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group: Any) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.14
    gather(out, inp, group=group)


def _fp8_format(fmt: str | FloatFormat) -> FloatFormat:
    fmt = get_format(fmt)
    if fmt.name not in _FP8_FORMATS:
        raise ValueError(f"FP8 communication format must be one of {list(_FP8_FORMATS)}, got {fmt.name!r}.")
    return fmt


def _shard_segments(sizes: Sequence[int], lo: int, hi: int) -> tuple[list[int], list[int]]:
    """Indices of the tensors overlapping the flat range [lo, hi) and how many elements each has there."""
    ids, counts, start = [], [], 0
    for i, n in enumerate(sizes):
        end = start + n
        overlap = min(end, hi) - max(start, lo)
        if overlap > 0:
            ids.append(i)
            counts.append(overlap)
        start = end
        if start >= hi:
            break
    return ids, counts


def _reduce_payload(
    payload: torch.Tensor, scale_inv: torch.Tensor, sizes: Sequence[int], fmt: FloatFormat, group: Any, average: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-reduce a flat uint8 FP8 payload with per-tensor ``scale_inv``; see the module docstring."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device, total, n_tensors = payload.device, payload.numel(), len(sizes)
    chunk = -(-total // world)
    send = torch.zeros(chunk * world, dtype=torch.uint8, device=device)
    send[:total] = payload  # byte 0 is +0.0 in both FP8 formats, so the padding is zeros
    all_sinv = torch.empty(world * n_tensors, dtype=torch.float32, device=device)
    _all_gather_flat(all_sinv, scale_inv.to(torch.float32).contiguous(), group)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)

    lo, hi = rank * chunk, min((rank + 1) * chunk, total)
    ids, counts = _shard_segments(sizes, lo, hi)
    valid = max(hi - lo, 0)
    shard = torch.zeros(chunk, dtype=torch.float32, device=device)
    amax = torch.zeros(n_tensors, dtype=torch.float32, device=device)
    if valid:
        ids_t = torch.tensor(ids, device=device)
        counts_t = torch.tensor(counts, device=device)
        sender_scales = all_sinv.view(world, n_tensors)[:, ids_t].repeat_interleave(counts_t, dim=1, output_size=valid)
        values = to_float32(recv.view(world, chunk)[:, :valid].view(fmt.dtype)) * sender_scales
        summed = values.sum(0)  # fp32; a NaN sender scale makes its tensor NaN here
        if average:
            summed.div_(world)
        shard[:valid] = summed
        amax[ids_t] = torch.segment_reduce(summed.abs(), "max", lengths=counts_t)
    # NCCL's MAX ignores NaN: send it as inf so that every rank sees the bad tensor.
    amax = torch.where(torch.isnan(amax), torch.full_like(amax, float("inf")), amax)
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    scale = pow2_scale(amax, fmt.max)
    bad = ~torch.isfinite(amax)
    out_sinv = torch.where(bad, torch.full_like(scale, float("nan")), torch.reciprocal(scale))

    mine = torch.zeros(chunk, dtype=torch.uint8, device=device)
    if valid:
        elem_scale = scale[ids_t].repeat_interleave(counts_t, output_size=valid)  # output_size: no device sync
        q = (shard[:valid] * elem_scale).clamp_(-fmt.max, fmt.max).to(fmt.dtype)
        mine[:valid] = q.view(torch.uint8)
    gathered = torch.empty(chunk * world, dtype=torch.uint8, device=device)
    _all_gather_flat(gathered, mine, group)
    return gathered[:total], out_sinv


def fp8_all_reduce(
    tensors: Sequence[ScaledTensor], group: Any = None, *, average: bool = True
) -> tuple[list[ScaledTensor], torch.Tensor]:
    """All-reduce per-tensor scaled FP8 tensors (e.g. FP8 weight gradients) across the ranks of ``group``.

    Args:
        tensors: :class:`~lightning_plugins.fp8.ScaledTensor` s, all E4M3 or all E5M2, on one device;
            every rank passes the same shapes in the same order.
        group: the process group (default: the world).
        average: divide the sum by the world size (DDP's gradient averaging).

    Returns:
        ``(reduced, nonfinite)``: new :class:`ScaledTensor` s in the input format with one shared
        power-of-two scale per tensor, bit-identical on every rank, and a bool 0-d tensor that is True
        on every rank when any rank's input held inf/NaN (those tensors get a NaN ``scale_inv``).
        Without an initialized process group (or with one rank) the inputs are returned as they are.
    """
    tensors = list(tensors)
    if not tensors:
        return [], torch.zeros((), dtype=torch.bool)
    for t in tensors:
        if not isinstance(t, ScaledTensor):
            raise TypeError(f"fp8_all_reduce expects ScaledTensor inputs, got {type(t).__name__}.")
    fmt = _fp8_format(tensors[0].data.dtype)
    if any(t.data.dtype != fmt.dtype for t in tensors):
        raise ValueError(
            f"fp8_all_reduce needs one FP8 format for all tensors, got {sorted({str(t.data.dtype) for t in tensors})}."
        )
    device = tensors[0].data.device
    sinv = torch.stack([t.scale_inv.reshape(()).to(device=device, dtype=torch.float32) for t in tensors])
    if _world_size(group) == 1:
        return tensors, (~torch.isfinite(sinv)).any()
    sizes = [t.data.numel() for t in tensors]
    payload = torch.cat([t.data.reshape(-1).view(torch.uint8) for t in tensors])
    flat, out_sinv = _reduce_payload(payload, sinv, sizes, fmt, group, average)
    out, start = [], 0
    for t, n, s in zip(tensors, sizes, out_sinv):
        out.append(ScaledTensor(flat[start : start + n].view(fmt.dtype).view(t.data.shape), s))
        start += n
    return out, (~torch.isfinite(out_sinv)).any()


def fp8_all_reduce_(
    tensors: Sequence[torch.Tensor], group: Any = None, *, average: bool = True, fmt: str = "e4m3"
) -> torch.Tensor:
    """In place: all-reduce high-precision tensors (e.g. gradients) with FP8 payloads.

    Each tensor is quantized to ``fmt`` with its own just-in-time power-of-two scale, reduced with
    :func:`fp8_all_reduce`, and overwritten with the dequantized result (bit-identical on every rank).
    Returns the bool 0-d non-finite flag (True on every rank if any rank had inf/NaN; those tensors
    become NaN). With no process group or one rank the tensors are left untouched.
    """
    tensors = list(tensors)
    fmt_ = _fp8_format(fmt)
    if not tensors:
        return torch.zeros((), dtype=torch.bool)
    if _world_size(group) == 1:
        return torch.stack([~torch.isfinite(t).all() for t in tensors]).any()
    scaled = []
    for t in tensors:
        q, bad = quantize(t, fmt_)
        scaled.append(ScaledTensor(q.data, torch.where(bad, torch.full_like(q.scale_inv, float("nan")), q.scale_inv)))
    reduced, nonfinite = fp8_all_reduce(scaled, group, average=average)
    for t, r in zip(tensors, reduced):
        t.copy_(r.dequantize(t.dtype))
    return nonfinite


@dataclass
class FP8CommHookState:
    """State of :func:`fp8_comm_hook`.

    Attributes:
        process_group: the DDP process group (``None``: the world).
        fp8_params: the parameters whose gradients travel as FP8 (by identity); ``None`` means all.
            The others are all-reduced in their own dtype, as DDP's default hook does.
        fmt: ``"e4m3"`` (MS-AMP's weight-gradient format) or ``"e5m2"``.
    """

    process_group: Any = None
    fp8_params: Iterable[torch.Tensor] | None = None
    fmt: str = "e4m3"
    _ids: set[int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        _fp8_format(self.fmt)
        self._ids = None if self.fp8_params is None else {id(p) for p in self.fp8_params}
        self.fp8_params = None  # keep no strong references to the parameters

    def selects(self, param: torch.Tensor) -> bool:
        """Does ``param``'s gradient travel as FP8?"""
        return self._ids is None or id(param) in self._ids


def fp8_comm_hook(state: FP8CommHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: FP8 gradients for the selected parameters, the rest in their own dtype.

    Register it with :func:`register_fp8_comm_hook` (or ``ddp_model.register_comm_hook(state, fp8_comm_hook)``).
    The bucket is averaged over the ranks like DDP's default hook. The collectives run before the
    hook returns (an already completed future), which works on every backend.
    """
    group = state.process_group
    world = _world_size(group)
    buffer = bucket.buffer()
    # The buffer holds the bucket's gradients back to back, in parameter order.
    fp8_views, hp_views, start = [], [], 0
    for param in bucket.parameters():
        view = buffer[start : start + param.numel()]
        start += param.numel()
        (fp8_views if state.selects(param) and param.is_floating_point() else hp_views).append(view)
    if fp8_views:
        fp8_all_reduce_(fp8_views, group, average=True, fmt=state.fmt)
    if hp_views:
        flat = torch.cat(hp_views) if len(hp_views) > 1 else hp_views[0].clone()
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        offset = 0
        for view in hp_views:
            view.copy_(flat[offset : offset + view.numel()])
            offset += view.numel()
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(buffer)
    return fut


def register_fp8_comm_hook(
    ddp_model: torch.nn.parallel.DistributedDataParallel,
    fp8_params: Iterable[torch.Tensor] | None = None,
    fmt: str = "e4m3",
) -> FP8CommHookState:
    """Register :func:`fp8_comm_hook` on a ``DistributedDataParallel`` model; returns the hook state.

    Args:
        ddp_model: the wrapped model (a DDP model accepts one communication hook).
        fp8_params: parameters whose gradients are sent as FP8 (default: all floating-point ones).
        fmt: the FP8 wire format, ``"e4m3"`` or ``"e5m2"``.
    """
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(
            f"register_fp8_comm_hook expects a DistributedDataParallel model, got {type(ddp_model).__name__}."
        )
    state = FP8CommHookState(ddp_model.process_group, fp8_params, fmt)
    try:
        ddp_model.register_comm_hook(state, fp8_comm_hook)
    except RuntimeError as err:
        raise RuntimeError(
            f"Could not register the FP8 communication hook: {err}. A DDP model accepts one hook; remove the "
            "other hook (e.g. DDPStrategy(ddp_comm_hook=...)) or turn FP8 gradient communication off."
        ) from err
    return state
