"""Shared pieces of the alignment module tests: hand-built contract-4 batches and a quiet CPU Trainer."""

from __future__ import annotations

import lightning.pytorch as pl
import torch


def preference_batch(tokenizer, triples, pad_id=None, margins=None, left=False, pair_index=None) -> dict:
    """Contract-4 batch from (prompt, chosen, rejected) strings: chosen rows, then rejected rows; EOS closes each
    completion; right padding (``left=True``: left padding) with ``pad_id`` (default the tokenizer's)."""
    pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
    rows, completions = [], []
    for index in (1, 2):
        for triple in triples:
            p = tokenizer(triple[0], add_special_tokens=False)["input_ids"]
            c = tokenizer(triple[index], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append(p + c)
            completions.append([0] * len(p) + [1] * len(c))
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), pad_id)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    completion_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (ids, comp) in enumerate(zip(rows, completions)):
        span = slice(length - len(ids), length) if left else slice(0, len(ids))
        input_ids[i, span], attention_mask[i, span], completion_mask[i, span] = torch.tensor(ids), 1, torch.tensor(comp)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            "margin": torch.tensor(margins if margins is not None else [0.0] * len(triples)),
            "pair_index": torch.arange(len(triples)) if pair_index is None else torch.as_tensor(pair_index)}


def tiny_trainer(**kwargs) -> pl.Trainer:
    """A quiet single-CPU Trainer (no logger, checkpoints, progress bar or sanity check) with ``kwargs`` on top."""
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**defaults, **kwargs})
