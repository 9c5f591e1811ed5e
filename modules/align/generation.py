"""The batched sampling loop behind rejection sampling: :func:`sample_responses` and its :class:`SamplingStats`.

K samples per prompt from a Hugging Face causal LM with an own loop (KV cache, left padding, a seeded
``torch.Generator``): pure temperature / top-p sampling from the policy, no ``generation_config`` defaults such as
``top_k=50`` or repetition penalties leaking in.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lightning_plugins.modules.align._common import check_float as _check_float, check_int as _check_int

__all__ = ["SamplingStats", "sample_responses"]

log = logging.getLogger(__name__)


@dataclass
class SamplingStats:
    """What :func:`sample_responses` produced; prompts short of ``k`` unique responses are counted, never hidden."""

    num_prompts: int
    k: int
    draws: int
    """Total sequences generated (re-samples for uniqueness included)."""
    mean_unique: float
    """Mean number of distinct responses returned per prompt."""
    min_unique: int
    num_short: int
    """Prompts that got fewer than ``k`` responses (uniqueness could not be reached within the draw budget)."""
    truncated: int
    """Draws that hit ``max_new_tokens`` without emitting EOS."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

def _forward_kwargs(model: torch.nn.Module) -> tuple[str | None, bool, bool]:
    """(name of the KV-cache kwarg or None, accepts ``position_ids``, accepts ``logits_to_keep``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrappers take **kwargs
    params = inspect.signature(base.forward).parameters
    cache = "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None
    return cache, "position_ids" in params, "logits_to_keep" in params


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else softmax(logits / T) restricted to the top-p nucleus."""
    logits = logits.float()
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def _generate_batch(model, prompts: list[list[int]], *, pad_id: int, eos_ids: torch.Tensor, temperature: float,
                    top_p: float, max_new_tokens: int, generator: torch.Generator) -> list[tuple[list[int], bool]]:
    """Sample one continuation per (left-padded) prompt; returns (ids before the first EOS, hit EOS) per row."""
    device = eos_ids.device
    cache_name, takes_positions, takes_keep = _forward_kwargs(model)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long, device=device)
        mask[row, width - len(ids):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def forward(ids, attention_mask, position_ids, cache):
        kwargs = {"input_ids": ids, "attention_mask": attention_mask}
        if takes_positions:
            kwargs["position_ids"] = position_ids
        if takes_keep:
            kwargs["logits_to_keep"] = 1
        if cache_name is not None:
            kwargs["use_cache"] = True
            if cache is not None:
                kwargs[cache_name] = cache
        out = model(**kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return out.logits[:, -1], new_cache

    logits, cache = forward(input_ids, mask, positions, None)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    steps = []
    for step in range(max_new_tokens):
        token = _next_tokens(logits, temperature, top_p, generator).to(device)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        steps.append(token)
        done |= torch.isin(token, eos_ids)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        input_ids = torch.cat([input_ids, token[:, None]], dim=1)
        if cache is not None:  # incremental step over the cache
            logits, cache = forward(token[:, None], mask, positions[:, -1:], cache)
        else:  # a model without a KV cache: recompute the whole sequence
            logits, _ = forward(input_ids, mask, positions, None)
    generated = torch.stack(steps, dim=1).tolist()
    eos = set(eos_ids.tolist())
    rows = []
    for ids in generated:
        cut = next((i for i, t in enumerate(ids) if t in eos), None)
        rows.append((ids if cut is None else ids[:cut], cut is not None))
    return rows


def _eos_ids(model, tokenizer, eos_token_ids: Sequence[int] | None) -> list[int]:
    if eos_token_ids is not None:
        ids = list(eos_token_ids)
    else:
        ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids += config_eos if isinstance(config_eos, list) else [] if config_eos is None else [config_eos]
    ids = sorted({int(i) for i in ids})
    if not ids:
        raise ValueError("No EOS token id: the tokenizer has no `eos_token_id` and none was given; pass "
                         "`eos_token_ids=[...]` or use a tokenizer with an EOS token.")
    return ids


def sample_responses(model, tokenizer, prompt_ids: list[list[int]], k: int, temperature: float = 0.7,
                     top_p: float = 1.0, max_new_tokens: int = 64, unique: bool = True, max_attempts_factor: int = 4,
                     batch_size: int = 64, seed: int = 0, *, eos_token_ids: Sequence[int] | None = None,
                     strip: bool = True, return_stats: bool = False
                     ) -> list[list[str]] | tuple[list[list[str]], SamplingStats]:
    """Draw ``k`` responses per prompt from a causal LM (batched, left-padded, KV-cached).

    Args:
        model: a Hugging Face causal LM (or a peft wrapper of one); run in eval mode, restored afterwards.
        tokenizer: decodes the samples (``skip_special_tokens=True``); its pad/EOS ids are used.
        prompt_ids: token ids of each prompt, already templated (e.g. ``ChatTemplate.prompt_ids``); non-empty.
        k: responses per prompt.
        temperature: softmax temperature; 0 means greedy.
        top_p: nucleus mass (1.0 = no truncation).
        max_new_tokens: generation length cap; a draw that hits it without EOS is kept and counted as truncated.
        unique: deduplicate by exact string and re-sample until ``k`` distinct responses or
            ``max_attempts_factor * k`` draws for that prompt; short prompts keep what they got and are counted in
            :class:`SamplingStats` (and logged as a warning).
        batch_size: sequences generated per forward pass.
        seed: seeds a private ``torch.Generator``; equal arguments give equal outputs (global RNG untouched).
        eos_token_ids: stop ids (default: the tokenizer's EOS plus the model's ``generation_config`` EOS ids).
        strip: strip surrounding whitespace from decoded responses (templates add the space before an answer).
        return_stats: also return the :class:`SamplingStats`.

    Returns:
        per prompt, the responses in order of first draw (cut at the first EOS, EOS excluded).
    """
    k = _check_int("k", k, 1)
    temperature = _check_float("temperature", temperature, 0.0, math.inf)
    top_p = _check_float("top_p", top_p, 0.0, 1.0, low_open=True)
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
    max_attempts_factor = _check_int("max_attempts_factor", max_attempts_factor, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    for i, ids in enumerate(prompt_ids):
        if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(t, int) for t in ids):
            raise ValueError(f"prompt_ids[{i}] must be a non-empty list of token ids, got {ids!r}; encode the prompt "
                             "with its chat template (a causal LM needs at least one token, e.g. BOS).")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max((len(p) for p in prompt_ids), default=0)
    if isinstance(limit, int) and longest + max_new_tokens > limit:
        raise ValueError(f"The longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} exceeds the "
                         f"model's max_position_embeddings={limit}; lower max_new_tokens or shorten the prompts.")

    device = next(model.parameters()).device
    eos = torch.tensor(_eos_ids(model, tokenizer, eos_token_ids), device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(eos[0])
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)

    kept: list[list[str]] = [[] for _ in prompt_ids]
    seen: list[set[str]] = [set() for _ in prompt_ids]
    drawn = [0] * len(prompt_ids)
    truncated = 0
    budget = max_attempts_factor * k if unique else k
    request = {i: k for i in range(len(prompt_ids))}
    was_training = model.training
    model.eval()
    try:
        while request:
            jobs = [i for i, n in request.items() for _ in range(n)]
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start:start + batch_size]
                rows = _generate_batch(model, [list(prompt_ids[i]) for i in chunk], pad_id=pad_id, eos_ids=eos,
                                       temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                       generator=generator)
                for i, (ids, hit_eos) in zip(chunk, rows):
                    drawn[i] += 1
                    truncated += not hit_eos
                    text = tokenizer.decode(ids, skip_special_tokens=True)
                    text = text.strip() if strip else text
                    if unique and text in seen[i]:
                        continue
                    seen[i].add(text)
                    kept[i].append(text)
            request = {}
            if unique:
                for i in range(len(prompt_ids)):
                    deficit, left = k - len(kept[i]), budget - drawn[i]
                    if deficit > 0 and left > 0:  # oversample by the observed duplicate rate
                        rate = drawn[i] / max(len(kept[i]), 1)
                        request[i] = min(left, max(deficit, math.ceil(deficit * rate)))
    finally:
        model.train(was_training)

    kept = [responses[:k] for responses in kept]
    counts = [len(r) for r in kept]
    stats = SamplingStats(num_prompts=len(kept), k=k, draws=sum(drawn),
                          mean_unique=sum(len(set(r)) for r in kept) / max(len(kept), 1),
                          min_unique=min((len(set(r)) for r in kept), default=0),
                          num_short=sum(c < k for c in counts), truncated=truncated)
    if stats.num_short:
        log.warning("sampling: %d of %d prompts have fewer than k=%d unique responses after up to %d draws each "
                    "(mean unique %.2f, min %d); they keep what they have.", stats.num_short, stats.num_prompts, k,
                    budget, stats.mean_unique, stats.min_unique)
    log.info("sampling: %d prompts, %d draws, mean unique %.2f of k=%d, %d truncated at max_new_tokens=%d",
             stats.num_prompts, stats.draws, stats.mean_unique, k, truncated, max_new_tokens)
    return (kept, stats) if return_stats else kept
