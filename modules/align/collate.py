"""Collators (contracts 3 and 4) and the gradient-accumulation-window batch sampler of SFT training.

SFT batch: ``input_ids``, ``attention_mask``, ``labels`` (``-100`` off the loss), ``window_tokens`` (0-d long: the
counted target tokens ``labels[:, 1:] != -100`` of the whole accumulation window the batch belongs to).
Preference batch: ``input_ids``/``attention_mask``/``completion_mask`` with chosen rows first then rejected rows,
``margin`` (B,), ``pair_index`` (B,), and ``ref_chosen_logps``/``ref_rejected_logps`` (B,) once attached.
Everything is right-padded with the tokenizer's pad id.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch.utils.data import BatchSampler, Sampler

__all__ = ["PreferenceCollator", "SFTCollator", "WindowedBatchSampler", "WindowedIndex", "pad_right"]


class WindowedIndex(NamedTuple):
    """A dataset index tagged with the token count of its accumulation window (yielded by the batch sampler)."""

    index: int
    window_tokens: int


def pad_right(rows: Sequence[Sequence[int]], value: int, length: int | None = None) -> torch.Tensor:
    """``(len(rows), length or max len)`` long tensor of the rows padded on the right with ``value``."""
    length = max(len(r) for r in rows) if length is None else length
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


class SFTCollator:
    """Rows ``{"input_ids", "loss_mask"[, "window_tokens"]}`` -> the SFT batch of contract 3."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = pad_right([r["input_ids"] for r in rows], self.pad_token_id)
        attention_mask = pad_right([[1] * len(r["input_ids"]) for r in rows], 0, input_ids.shape[1])
        loss_mask = pad_right([r["loss_mask"] for r in rows], 0, input_ids.shape[1]).bool()
        labels = input_ids.masked_fill(~loss_mask, -100)
        own = int((labels[:, 1:] != -100).sum())
        windows = {r["window_tokens"] for r in rows if "window_tokens" in r}
        if len(windows) > 1:
            raise RuntimeError(f"One batch spans several accumulation windows ({sorted(windows)}); this is a bug.")
        window = windows.pop() if windows else own
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "window_tokens": torch.tensor(window, dtype=torch.long),
        }


class PreferenceCollator:
    """Rows ``{"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", "margin", "pair_index"}`` (+ optional
    ``ref_chosen_logps``/``ref_rejected_logps``) -> the preference batch of contract 4 (chosen rows first)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        masks = [r["chosen_mask"] for r in rows] + [r["rejected_mask"] for r in rows]
        input_ids = pad_right(seqs, self.pad_token_id)
        length = input_ids.shape[1]
        batch = {
            "input_ids": input_ids,
            "attention_mask": pad_right([[1] * len(s) for s in seqs], 0, length),
            "completion_mask": pad_right(masks, 0, length),
            "margin": torch.tensor([float(r["margin"]) for r in rows], dtype=torch.float32),
            "pair_index": torch.tensor([int(r["pair_index"]) for r in rows], dtype=torch.long),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if all(key in r for r in rows):
                batch[key] = torch.tensor([float(r[key]) for r in rows], dtype=torch.float32)
        return batch


class WindowedBatchSampler(BatchSampler):
    """Batches of ``sampler`` grouped into windows of ``accumulate_grad_batches``; yields lists of
    :class:`WindowedIndex` whose ``window_tokens`` is the sum of ``token_counts`` over the window's rows.

    Windows restart each epoch, as Lightning's accumulation does, and the last window of an epoch may be
    incomplete (it counts only its own batches). Under DDP Lightning re-creates this sampler around its
    ``DistributedSampler``, so windows and counts are per rank, as contract 3 wants.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Sequence[int],
        batch_size: int,
        drop_last: bool = False,
        accumulate_grad_batches: int = 1,
        token_counts: Sequence[int] = (),
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        if not isinstance(accumulate_grad_batches, int) or accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be an int >= 1, got {accumulate_grad_batches!r}.")
        self.accumulate_grad_batches = accumulate_grad_batches
        self.token_counts = list(token_counts)

    def __iter__(self) -> Iterator[list[WindowedIndex]]:
        window: list[list[int]] = []
        for batch in super().__iter__():
            window.append(batch)
            if len(window) == self.accumulate_grad_batches:
                yield from self._tag(window)
                window = []
        if window:
            yield from self._tag(window)

    def _tag(self, window: list[list[int]]) -> Iterator[list[WindowedIndex]]:
        total = sum(self.token_counts[i] for batch in window for i in batch)
        for batch in window:
            yield [WindowedIndex(int(i), total) for i in batch]
