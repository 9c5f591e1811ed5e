"""Summed log-probabilities of completion tokens, the quantity every preference loss is built on.

Label shift, stated once: a causal LM's ``logits[:, t]`` is its distribution for the token at position ``t + 1``.
With ``shift_labels=True`` (the default, Hugging Face's ``labels=input_ids`` convention) ``labels`` and
``loss_mask`` are aligned with ``input_ids`` and this module pairs ``logits[:, t]`` with ``labels[:, t + 1]``;
the first label has no prediction and the last logit has no target, so the per-token outputs have length
``T - 1``. With ``shift_labels=False`` the caller has already shifted: ``labels[:, t]`` is the target of
``logits[:, t]`` and outputs have length ``T``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

__all__ = ["SequenceLogps", "sequence_logps"]

# Rows of (positions x vocab) processed at once: bounds the temporary upcast copy to about 64 MiB of fp32.
_CHUNK_ELEMENTS = 1 << 24


class SequenceLogps(NamedTuple):
    """Result of :func:`sequence_logps`; ``logps`` is the per-sequence sum TRL's DPO uses."""

    logps: torch.Tensor
    """``(B,)`` sum of the log-probs of the counted tokens (0 for a sequence with none)."""
    num_tokens: torch.Tensor
    """``(B,)`` number of counted tokens (int64)."""
    per_token: torch.Tensor
    """``(B, L)`` log-prob of each target token, 0 where not counted; ``L`` is ``T - 1`` when shifting."""
    mask: torch.Tensor
    """``(B, L)`` bool, True where a token is counted; aligned with ``per_token``."""

    @property
    def mean_logps(self) -> torch.Tensor:
        """``(B,)`` per-token mean log-prob; the token count is clamped to 1 as TRL does for empty sequences."""
        return self.logps / self.num_tokens.clamp(min=1).to(self.logps.dtype)


class _TargetLogProbs(torch.autograd.Function):
    """``log_softmax(logits[r, c])[target]`` at selected positions, chunked in forward and backward.

    Only the chunk being processed is upcast; nothing of vocabulary size is saved for backward except the input
    logits themselves (which autograd keeps alive anyway), unlike ``log_softmax`` whose full output is saved.
    """

    @staticmethod
    def forward(ctx, logits, rows, cols, targets, chunk_size, compute_dtype):
        lse = torch.empty(rows.shape[0], dtype=compute_dtype, device=logits.device)
        picked = torch.empty_like(lse)
        for start in range(0, rows.shape[0], chunk_size):
            stop = start + chunk_size
            chunk = logits[rows[start:stop], cols[start:stop]].to(compute_dtype)
            lse[start:stop] = torch.logsumexp(chunk, dim=-1)
            picked[start:stop] = chunk.gather(-1, targets[start:stop, None]).squeeze(-1)
        ctx.save_for_backward(logits, rows, cols, targets, lse)
        ctx.chunk_size = chunk_size
        return picked - lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logits, rows, cols, targets, lse = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        for start in range(0, rows.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            r, c, g = rows[start:stop], cols[start:stop], grad_out[start:stop, None]
            # d/dx [x_y - logsumexp(x)] = onehot(y) - softmax(x)
            chunk = torch.exp(logits[r, c].to(lse.dtype) - lse[start:stop, None]).mul_(-g)
            chunk.scatter_add_(-1, targets[start:stop, None], g)
            grad[r, c] = chunk.to(grad.dtype)
        return grad, None, None, None, None, None


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    shift_labels: bool = True,
    chunk_size: int | None = None,
) -> SequenceLogps:
    """Per-sequence sum of target-token log-probs, counting only completion tokens.

    Args:
        logits: ``(B, T, V)`` float logits of a causal LM (any float dtype; math runs in fp32, or fp64 for fp64).
        labels: ``(B, T)`` integer target ids; with ``shift_labels=True`` simply the ``input_ids``.
        loss_mask: optional ``(B, T)`` 0/1 or bool mask aligned with ``labels`` (TRL's ``completion_mask``):
            1 on completion tokens, 0 on prompt and padding. It is shifted together with ``labels``.
        ignore_index: label value that is never counted (prompt/padding in Hugging Face ``labels``). A token
            counts when its label differs from ``ignore_index`` *and* ``loss_mask`` is 1 there. Without a
            ``loss_mask`` and without ``ignore_index`` labels, every target token counts, the prompt included.
        shift_labels: pair ``logits[:, t]`` with ``labels[:, t + 1]`` (see the module docstring); set False when
            ``labels`` are already shifted.
        chunk_size: positions whose vocabulary row is processed at once; default keeps the temporary fp32 copy
            near 64 MiB. Never materializes a full-size log-softmax.

    Returns:
        :class:`SequenceLogps` with ``logps`` (sum), ``num_tokens``, ``per_token``, ``mask`` and ``mean_logps``.
        Gradients flow into ``logits`` only.
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(
            "`logits` and `labels` must be torch.Tensors, got "
            f"{type(logits).__name__} and {type(labels).__name__}."
        )
    if not logits.is_floating_point() or logits.ndim != 3:
        raise ValueError(
            f"`logits` must be a floating tensor of shape (batch, seq_len, vocab), got dtype {logits.dtype} and "
            f"shape {tuple(logits.shape)}."
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"`labels` must be an integer tensor of token ids, got dtype {labels.dtype}. Use `.long()`.")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"`labels` has shape {tuple(labels.shape)} but `logits` has shape {tuple(logits.shape)}; labels must be "
            "(batch, seq_len) matching the logits' first two dims (pass the full `input_ids`, not a slice)."
        )
    if loss_mask is not None:
        if not isinstance(loss_mask, torch.Tensor) or loss_mask.shape != labels.shape:
            shape = tuple(loss_mask.shape) if isinstance(loss_mask, torch.Tensor) else type(loss_mask).__name__
            raise ValueError(f"`loss_mask` must be a tensor of shape {tuple(labels.shape)} like `labels`, got {shape}.")
        if loss_mask.dtype != torch.bool:
            bad = loss_mask[(loss_mask != 0) & (loss_mask != 1)]
            if bad.numel():
                raise ValueError(
                    f"`loss_mask` must contain only 0 and 1 (or be bool), found {bad[0].item()}; weighted masks are "
                    "not supported."
                )
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}.")

    if shift_labels:
        labels = labels[:, 1:]
        loss_mask = None if loss_mask is None else loss_mask[:, 1:]
    mask = labels != ignore_index
    if loss_mask is not None:
        mask &= loss_mask.bool()

    # Index into the unshifted logits: position (b, t) of the shifted view is (b, t) of the original, so no
    # slice of the logits is ever taken and backward writes straight into a gradient of the logits' own shape.
    rows, cols = mask.nonzero(as_tuple=True)
    targets = labels[rows, cols].long()
    vocab = logits.shape[-1]
    if targets.numel():
        low, high = targets.min().item(), targets.max().item()
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(
                f"label id {bad} at a counted position is outside the vocabulary [0, {vocab}); mask it out with "
                f"`loss_mask` or set it to ignore_index={ignore_index}."
            )

    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    token_logps = _TargetLogProbs.apply(logits, rows, cols, targets, chunk_size, compute_dtype)
    per_token = torch.zeros(mask.shape, dtype=compute_dtype, device=logits.device).index_put(
        (rows, cols), token_logps
    )
    return SequenceLogps(per_token.sum(dim=1), mask.sum(dim=1), per_token, mask)
