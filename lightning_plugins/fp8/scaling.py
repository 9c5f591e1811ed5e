"""Power-of-two per-tensor scaling and the amax-history state (MS-AMP's ScalingMeta, device-agnostic).

A :class:`ScalingState` belongs to one tensor role (e.g. a layer's input). It decides the scale
used to quantize that tensor and records the tensor's amax:

* **just-in-time** (JIT): scale from the current tensor's amax. Used while the history is warming
  up (fewer than ``history_len`` recorded steps) and always when ``history_len == 1`` (weights and
  weight gradients).
* **delayed**: after the warm-up, the scale comes from the max over the last ``history_len`` steps'
  amaxes, computed by :meth:`ScalingState.update`, which the training loop calls once per optimizer
  step (or skipped step).

Recording can be frozen with :func:`frozen_scaling` (evaluation must not pollute the history);
a frozen cast still uses a JIT scale computed from the current tensor, but changes no state.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from lightning_plugins.fp8.buffers import DeviceOnlyBuffers
from lightning_plugins.fp8.formats import FloatFormat, get_format

__all__ = ["pow2_scale", "ScalingState", "frozen_scaling", "scaling_frozen", "update_scaling_states"]

# fp32 scales stay finite and exactly invertible within 2^±126.
_MAX_EXP = 126.0


def pow2_scale(
    amax: torch.Tensor | float,
    fp_max: float | str | FloatFormat,
    *,
    margin: int = 0,
    prev_scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Power-of-two quantization scale (multiplier) from an absolute maximum, as in MS-AMP.

    ``exp = floor(log2(fp_max / amax)) - margin``; the scale is ``2**exp``. The previous scale is
    kept where ``amax`` is 0 or not finite. Because the scale is a power of two, dequantizing with
    ``1/scale`` is exact.

    Args:
        amax: absolute maximum (a tensor of any shape, or a float).
        fp_max: the format's largest finite value, or a format (name or :class:`FloatFormat`).
        margin: extra powers of two of headroom (``>= 0``).
        prev_scale: scale returned where ``amax`` is 0, inf or NaN.

    Returns:
        An fp32 tensor shaped like ``amax``.
    """
    if isinstance(fp_max, (str, FloatFormat)):
        fp_max = get_format(fp_max).max
    if not isinstance(fp_max, (int, float)) or not fp_max > 0 or not math.isfinite(fp_max):
        raise ValueError(f"fp_max must be a positive finite number or a format, got {fp_max!r}.")
    _check_margin(margin)
    amax_t = torch.as_tensor(amax, dtype=torch.float32)
    prev = torch.as_tensor(prev_scale, dtype=torch.float32, device=amax_t.device)
    exp = torch.floor(torch.log2(fp_max / amax_t)) - margin
    # amax subnormal -> ratio inf -> exp inf: clamp so the scale stays finite.
    exp = exp.clamp(-_MAX_EXP, _MAX_EXP)
    # 2**exp assembled from its IEEE-754 bits (biased exponent, zero mantissa): exact by construction, and fewer
    # kernels than exp2 plus rounding. (A NaN exp gives garbage bits here, but then `valid` is false.)
    scale = ((exp.to(torch.int32) + 127) << 23).view(torch.float32)
    valid = (amax_t > 0) & torch.isfinite(amax_t)
    return torch.where(valid, scale, prev)


def _check_margin(margin: Any) -> None:
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ValueError(f"margin must be an int >= 0 (powers of two of headroom), got {margin!r}.")


_FROZEN_DEPTH = 0


@contextlib.contextmanager
def frozen_scaling() -> Iterator[None]:
    """Context manager: FP8 casts inside it neither record amaxes nor change scales.

    Use it around evaluation (or any forward that is not a training step) so the amax history
    only reflects training steps. :class:`~lightning_plugins.fp8.FP8Linear` also freezes by itself
    in ``eval()`` mode and under ``torch.no_grad()``. Nesting is allowed.
    """
    global _FROZEN_DEPTH
    _FROZEN_DEPTH += 1
    try:
        yield
    finally:
        _FROZEN_DEPTH -= 1


def scaling_frozen() -> bool:
    """True inside :func:`frozen_scaling`."""
    return _FROZEN_DEPTH > 0


class ScalingState(DeviceOnlyBuffers):
    """Per-tensor scaling state: scale, amax history (delayed scaling) and a warm-up counter.

    It is an ``nn.Module`` only so that ``module.to(device)`` moves its tensors with the layer
    that owns it (and nothing else: see :class:`DeviceOnlyBuffers`); its buffers are
    non-persistent, so a model's ``state_dict`` stays loadable into plain ``nn.Linear`` layers.
    Save and restore it with :meth:`get_scaling_state` / :meth:`set_scaling_state`. Its tensors
    stay fp32/int32 under ``module.half()`` and the like.

    Buffers:
        scale: fp32 0-d, the quantization multiplier (``q = cast(x * scale)``).
        amax_history: fp32 ``(history_len,)``; slot 0 is the current step.
        counter: int32 0-d, recorded steps since creation or the last non-finite amax (saturates
            at ``history_len``); JIT scaling is used while ``counter < history_len``.
        nonfinite_count: int32 0-d, casts with a non-finite amax since the last :meth:`update`.

    Args:
        fmt: storage format (``"e4m3"``, ``"e5m2"``, ``"fp16"`` or a :class:`FloatFormat`).
        history_len: amax window; 1 means always just-in-time.
        margin: powers of two of headroom in the scale formula.
        device: where the state's tensors live.
    """

    def __init__(
        self,
        fmt: str | FloatFormat = "e4m3",
        history_len: int = 16,
        margin: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(history_len, bool) or not isinstance(history_len, int) or history_len < 1:
            raise ValueError(f"history_len must be an int >= 1 (1 = always just-in-time), got {history_len!r}.")
        _check_margin(margin)
        self.fmt = get_format(fmt)
        self.history_len = history_len
        self.margin = margin
        f32, i32 = {"dtype": torch.float32, "device": device}, {"dtype": torch.int32, "device": device}
        self.register_buffer("scale", torch.ones((), **f32), persistent=False)
        self.register_buffer("amax_history", torch.zeros(history_len, **f32), persistent=False)
        self.register_buffer("counter", torch.zeros((), **i32), persistent=False)
        self.register_buffer("nonfinite_count", torch.zeros((), **i32), persistent=False)

    def extra_repr(self) -> str:
        return f"fmt={self.fmt.name}, history_len={self.history_len}, margin={self.margin}"

    def fresh(self, name: str, like: torch.Tensor, device: torch.device) -> torch.Tensor:
        return torch.ones_like(like, device=device) if name == "scale" else torch.zeros_like(like, device=device)

    @property
    def in_warmup(self) -> bool:
        """True while casts use just-in-time scaling (host sync; for inspection and tests)."""
        return self.history_len == 1 or int(self.counter) < self.history_len

    def scale_for(self, amax: torch.Tensor, record: bool = True) -> torch.Tensor:
        """The scale to quantize a tensor with absolute maximum ``amax``.

        With ``record=True`` the amax is recorded in slot 0 of the history (max with what the
        current step already recorded, e.g. other micro-batches), and during the warm-up the
        state's scale follows the JIT value. With ``record=False`` (or inside
        :func:`frozen_scaling`) nothing changes and the JIT scale is returned.
        """
        amax = amax.detach().to(device=self.scale.device, dtype=torch.float32)
        jit = pow2_scale(amax, self.fmt.max, margin=self.margin, prev_scale=self.scale)
        if not record or scaling_frozen():
            return jit
        # NaN propagates through maximum, so a bad step stays visible in slot 0 until update().
        self.amax_history[0] = torch.maximum(self.amax_history[0], amax)
        self.nonfinite_count.add_((~torch.isfinite(amax)).to(torch.int32))
        # history_len == 1 is always JIT, whatever the counter says.
        delayed_ok = self.history_len > 1
        scale = torch.where(self.counter < self.history_len, jit, self.scale) if delayed_ok else jit
        self.scale.copy_(scale)
        return scale  # a new tensor (torch.where / pow2_scale), not the buffer

    def update(self) -> None:
        """Delayed-scaling step; call once after every optimizer step (taken or skipped).

        Sets the scale from the max over the window, rolls the window (slot 0 becomes the new
        current step) and advances the warm-up counter. A non-finite newest amax is dropped and
        the counter restarts, so the state falls back to JIT for a whole window (MS-AMP's
        recovery). Clears ``nonfinite_count``. Does nothing inside :func:`frozen_scaling`.
        :func:`update_scaling_states` does the same for many states at once.
        """
        update_scaling_states([self])

    @torch.no_grad()
    def reset(self) -> None:
        """Forget the history: scale 1, empty window, warm-up restarts."""
        self.scale.fill_(1.0)
        self.amax_history.zero_()
        self.counter.zero_()
        self.nonfinite_count.zero_()

    def get_scaling_state(self) -> dict[str, Any]:
        """A checkpointable copy of the state (plain tensors and ints, ``weights_only``-safe)."""
        return {
            "format": self.fmt.name,
            "history_len": self.history_len,
            "margin": self.margin,
            "scale": self.scale.detach().clone(),
            "amax_history": self.amax_history.detach().clone(),
            "counter": self.counter.detach().clone(),
        }

    @torch.no_grad()
    def set_scaling_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_scaling_state` returned; the format and window must match."""
        missing = {"format", "history_len", "scale", "amax_history", "counter"} - set(state)
        if missing:
            raise ValueError(f"Scaling state is missing keys {sorted(missing)}; pass a dict from get_scaling_state().")
        if state["format"] != self.fmt.name or int(state["history_len"]) != self.history_len:
            raise ValueError(
                f"Scaling state is for format={state['format']!r}, history_len={state['history_len']}, but this "
                f"state has format={self.fmt.name!r}, history_len={self.history_len}; build the layer with the "
                "same settings as the checkpoint."
            )
        self.scale.copy_(state["scale"])
        self.amax_history.copy_(state["amax_history"])
        self.counter.copy_(state["counter"])
        self.margin = int(state.get("margin", self.margin))
        self.nonfinite_count.zero_()


@torch.no_grad()
def update_scaling_states(states: Iterable[ScalingState]) -> None:
    """:meth:`ScalingState.update` for every state, batched: states sharing a window length, format,
    margin and device are updated with one set of stacked tensor ops (a handful of kernel launches for a
    whole model instead of a dozen per state). Does nothing inside :func:`frozen_scaling`."""
    if scaling_frozen():
        return
    groups: dict[tuple[Any, ...], list[ScalingState]] = {}
    for state in states:
        key = (state.history_len, state.fmt.max, state.margin, state.scale.device)
        groups.setdefault(key, []).append(state)
    for (history_len, fp_max, margin, _), group in groups.items():
        history = torch.stack([s.amax_history for s in group])  # (states, window); column 0 = this step
        counter = torch.stack([s.counter for s in group])
        newest = history[:, 0]
        bad = ~torch.isfinite(newest)
        history[:, 0] = torch.where(bad, torch.zeros_like(newest), newest)
        previous = torch.stack([s.scale for s in group])
        scale = pow2_scale(history.amax(dim=1), fp_max, margin=margin, prev_scale=previous)
        history = history.roll(1, dims=1)
        history[:, 0] = 0.0
        advanced = torch.clamp(counter + 1, max=history_len).to(torch.int32)
        counter = torch.where(bad, torch.zeros_like(counter), advanced)
        torch._foreach_copy_([s.scale for s in group], list(scale.unbind(0)))
        torch._foreach_copy_([s.amax_history for s in group], list(history.unbind(0)))
        torch._foreach_copy_([s.counter for s in group], list(counter.unbind(0)))
        torch._foreach_zero_([s.nonfinite_count for s in group])
