"""Rejection sampling (Xwin-LM's RS step): K unique samples per prompt, reward scores, best-of-k curves.

- :func:`sample_responses`: K samples per prompt from a Hugging Face causal LM (own batched sampling loop with a
  KV cache, left padding and a seeded ``torch.Generator``: pure temperature / top-p sampling from the policy, no
  ``generation_config`` defaults such as ``top_k=50`` or repetition penalties leaking in).
- :func:`rejection_sample`: sample, score with a reward callable, keep the best; rows in the multi-response jsonl
  format ``{prompt, responses, scores, best, best_score[, correct]}`` (Xwin-Set style).
- :func:`best_of_k_curve`: exact expected best-of-k accuracy / score by combinatorics over the ranked responses.
- :func:`write_jsonl`, :func:`read_multi_response_jsonl`, :func:`plot_best_of_k`.
- :func:`run_rejection_sampling`: the CLI-friendly entry point (checkpoints in, jsonl + curve files out).

Tie rule, used everywhere in this module and in :mod:`~lightning_plugins.modules.align.pairs`: among equal scores
the response that comes first in ``responses`` wins.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SamplingStats",
    "best_of_k_curve",
    "load_prompts",
    "plot_best_of_k",
    "read_multi_response_jsonl",
    "rejection_sample",
    "run_rejection_sampling",
    "sample_responses",
    "validate_multi_response_row",
    "write_jsonl",
]

log = logging.getLogger(__name__)

DRAWS = ("without_replacement", "with_replacement")
METRICS = ("correct", "score")


# --------------------------------------------------------------------------------------------------- sampling


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


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int >= {low}, got {value!r} ({type(value).__name__}).")
    if value < low:
        raise ValueError(f"`{name}` must be >= {low}, got {value}.")
    return value


def _check_float(name: str, value: object, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"`{name}` must be a finite number, got {value!r}.")
    if value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"`{name}` must lie in {interval}, got {value}.")
    return float(value)


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


# ------------------------------------------------------------------------------------------- rejection sampling


def _first_argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one among ties."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _as_verifier(verifier) -> Callable[[str, str], bool] | None:
    if verifier is None or callable(verifier):
        return verifier
    if callable(getattr(verifier, "is_correct", None)):
        return verifier.is_correct
    raise TypeError(f"`verifier` must be a callable (prompt, response) -> bool or have an `is_correct` method, "
                    f"got {type(verifier).__name__}.")


def rejection_sample(policy, tokenizer, prompts: list[str], scorer: Callable[[list[str], list[str]], torch.Tensor],
                     k: int = 16, *, encode_prompt: Callable[[str], list[int]] | None = None,
                     verifier: Callable[[str, str], bool] | None = None, temperature: float = 0.7,
                     top_p: float = 1.0, max_new_tokens: int = 64, unique: bool = True, max_attempts_factor: int = 4,
                     batch_size: int = 64, score_batch_size: int = 64, seed: int = 0, return_stats: bool = False
                     ) -> list[dict] | tuple[list[dict], SamplingStats]:
    """Sample ``k`` responses per prompt, score them and keep the best (first occurrence among ties).

    Args:
        policy: Hugging Face causal LM to sample from.
        tokenizer: its tokenizer.
        prompts: prompt strings (stored as-is in the rows).
        scorer: ``scorer(prompts, responses) -> (N,)`` rewards for N aligned pairs (e.g. a bound
            ``RewardModel.score_texts``); called on chunks of ``score_batch_size`` pairs under ``torch.no_grad``.
        k: responses per prompt (see :func:`sample_responses` for ``unique`` / ``max_attempts_factor``).
        encode_prompt: prompt string -> generation-prompt ids (default: ``tokenizer.encode`` without specials; pass
            the chat template's ``prompt_ids`` for chat models).
        verifier: optional ground truth ``(prompt, response) -> bool`` (or an object with ``is_correct``); adds
            ``"correct"`` to every row.
        return_stats: also return the :class:`SamplingStats`.

    Returns:
        multi-response rows ``{prompt, responses, scores, best, best_score[, correct]}``.
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("`prompts` must be a list of strings.")
    check = _as_verifier(verifier)
    if encode_prompt is None:
        encode_prompt = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    prompt_ids = [list(encode_prompt(p)) for p in prompts]
    log.info("rejection sampling: sampling k=%d for %d prompts (T=%.3g, top_p=%.3g)", k, len(prompts), temperature,
             top_p)
    responses, stats = sample_responses(policy, tokenizer, prompt_ids, k, temperature, top_p, max_new_tokens, unique,
                                        max_attempts_factor, batch_size, seed, return_stats=True)
    flat = [(p, r) for p, rs in zip(prompts, responses) for r in rs]
    log.info("rejection sampling: scoring %d responses", len(flat))
    scores: list[float] = []
    score_batch_size = _check_int("score_batch_size", score_batch_size, 1)
    for start in range(0, len(flat), score_batch_size):
        chunk = flat[start:start + score_batch_size]
        with torch.no_grad():
            out = scorer([p for p, _ in chunk], [r for _, r in chunk])
        out = torch.as_tensor(out).detach().float().cpu()
        if out.ndim == 2 and out.shape[-1] == 1:  # a (N, 1) score head
            out = out.squeeze(-1)
        if out.ndim != 1 or out.shape[0] != len(chunk):
            raise ValueError(f"`scorer` must return shape ({len(chunk)},) for {len(chunk)} pairs, got "
                             f"{tuple(out.shape)}.")
        if not torch.isfinite(out).all():
            raise ValueError(f"`scorer` returned non-finite scores {out.tolist()} for pairs {start}.."
                             f"{start + len(chunk) - 1}; check the reward model's dtype and inputs.")
        scores += out.tolist()
    rows, at = [], 0
    for prompt, rs in zip(prompts, responses):
        row_scores, at = scores[at:at + len(rs)], at + len(rs)
        best = _first_argmax(row_scores)
        row = {"prompt": prompt, "responses": rs, "scores": row_scores, "best": rs[best],
               "best_score": row_scores[best]}
        if check is not None:
            row["correct"] = [bool(check(prompt, r)) for r in rs]
        rows.append(row)
    if check is not None:
        log.info("rejection sampling: verifier accuracy of all samples %.4f, of the best %.4f",
                 sum(sum(r["correct"]) for r in rows) / max(len(flat), 1),
                 sum(r["correct"][r["responses"].index(r["best"])] for r in rows) / max(len(rows), 1))
    return (rows, stats) if return_stats else rows


# ------------------------------------------------------------------------------------------------ best-of-k


def _selection_probs(n: int, k: int, draws: str) -> list[float]:
    """P(the response at rank r, 0 = best, is the selected one) when best-of-k picks from a random k-draw."""
    if draws == "without_replacement":  # rank r wins iff it is drawn and none of the r better ones is
        total = math.comb(n, k)
        return [math.comb(n - r - 1, k - 1) / total for r in range(n)]
    # with replacement: the best drawn rank is r iff all k draws land in ranks >= r but not all in ranks > r
    return [((n - r) / n) ** k - ((n - r - 1) / n) ** k for r in range(n)]


def best_of_k_curve(rows: Sequence[Mapping[str, Any]], ks: Iterable[int] = (1, 4, 16, 64), metric: str = "correct",
                    draws: str = "without_replacement") -> dict[int, float]:
    """Exact expected value of best-of-k selection, averaged over rows (no Monte Carlo).

    For each row the K responses are ranked by score (descending; ties: the earlier response ranks higher, the
    same rule as ``best``). Drawing k of them uniformly without replacement, the one at 0-based rank r is selected
    with probability ``C(K - r - 1, k - 1) / C(K, k)``; with ``draws="with_replacement"`` (k i.i.d. picks from the K,
    closer to fresh policy samples when the K were not deduplicated) it is ``((K-r)/K)^k - ((K-r-1)/K)^k``.
    The value is ``sum_r P(r) * v_r`` with ``v`` = ``correct`` (0/1, ``metric="correct"``) or the score
    (``metric="score"``). A row with fewer than k responses uses k = K (its best response); such rows are counted
    in a warning.
    """
    if metric not in METRICS:
        raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}.")
    if draws not in DRAWS:
        raise ValueError(f"`draws` must be one of {DRAWS}, got {draws!r}.")
    ks = [_check_int("ks[i]", k, 1) for k in ks]
    if not rows:
        raise ValueError("`rows` is empty: nothing to compute a best-of-k curve from.")
    ranked = []
    for i, row in enumerate(rows):
        row = validate_multi_response_row(dict(row), f"rows[{i}]")
        if metric == "correct" and "correct" not in row:
            raise ValueError(f"rows[{i}] has no 'correct' list; run rejection sampling with a verifier or use "
                             "metric='score'.")
        values = row["correct"] if metric == "correct" else row["scores"]
        order = sorted(range(len(row["scores"])), key=lambda j: (-row["scores"][j], j))
        ranked.append([float(values[j]) for j in order])
    curve = {}
    for k in ks:
        clamped = sum(len(v) < k for v in ranked)
        if clamped:
            log.warning("best-of-k: %d of %d rows have fewer than k=%d responses; they count their best response.",
                        clamped, len(ranked), k)
        total = 0.0
        for values in ranked:
            probs = _selection_probs(len(values), min(k, len(values)), draws)
            total += sum(p * v for p, v in zip(probs, values))
        curve[k] = total / len(ranked)
    return curve


def plot_best_of_k(curve: Mapping[int, float] | Mapping[str, Mapping[int, float]], path: str | Path,
                   title: str = "best-of-k", ylabel: str | None = None) -> Path:
    """Write a PNG of one curve ``{k: value}`` or several named curves ``{name: {k: value}}`` (one panel each)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # matplotlib is optional
        raise ImportError("plot_best_of_k needs matplotlib: pip install matplotlib") from err
    named = bool(curve) and all(isinstance(v, Mapping) for v in curve.values())
    curves = dict(curve) if named else {ylabel or "value": curve}
    figure = Figure(figsize=(4.5 * len(curves), 3.5))
    FigureCanvasAgg(figure)
    for n, (name, points) in enumerate(curves.items(), start=1):
        ks = sorted(int(k) for k in points)
        ys = [points[k] if k in points else points[str(k)] for k in ks]
        axis = figure.add_subplot(1, len(curves), n)
        axis.plot(ks, ys, marker="o")
        axis.set_xscale("log", base=2)
        axis.set_xticks(ks, [str(k) for k in ks])
        axis.set_xlabel("k (responses drawn)")
        axis.set_ylabel(name)
        axis.grid(True, alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------------------------------- files


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_multi_response_row(row: object, where: str) -> dict:
    """Check one multi-response row; ``where`` (e.g. ``"file.jsonl:3"``) starts every error message.

    Missing ``best`` / ``best_score`` are filled from the scores (first occurrence among ties). Returns the row.
    """
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    if not isinstance(row.get("prompt"), str):
        raise ValueError(f"{where}: 'prompt' must be a string, got {row.get('prompt')!r}.")
    responses, scores = row.get("responses"), row.get("scores")
    if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
        raise ValueError(f"{where}: 'responses' must be a non-empty list of strings, got {responses!r}.")
    if not isinstance(scores, list) or not all(_is_number(s) for s in scores):
        raise ValueError(f"{where}: 'scores' must be a list of finite numbers, got {scores!r}.")
    if len(scores) != len(responses):
        raise ValueError(f"{where}: {len(responses)} responses but {len(scores)} scores; give one score per "
                         "response.")
    correct = row.get("correct")
    if correct is not None and (not isinstance(correct, list) or len(correct) != len(responses)
                                or not all(isinstance(c, bool) for c in correct)):
        raise ValueError(f"{where}: 'correct' must be a list of {len(responses)} booleans (one per response), got "
                         f"{correct!r}.")
    if "best" in row and not isinstance(row["best"], str):
        raise ValueError(f"{where}: 'best' must be a string, got {row['best']!r}.")
    if "best_score" in row and not _is_number(row["best_score"]):
        raise ValueError(f"{where}: 'best_score' must be a finite number, got {row['best_score']!r}.")
    if "best" not in row or "best_score" not in row:
        best = _first_argmax(scores)
        row.setdefault("best", responses[best])
        row.setdefault("best_score", scores[best])
    return row


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows as JSON lines (UTF-8, strict JSON: NaN/inf raise ValueError naming the row)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for i, row in enumerate(rows):
            try:
                handle.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
            except (TypeError, ValueError) as err:
                raise ValueError(f"row {i} cannot be written to {path} as JSON: {err}") from err
    return path


def read_multi_response_jsonl(path: str | Path) -> list[dict]:
    """Read and validate a multi-response jsonl (blank lines skipped); errors name ``file:line`` and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Multi-response file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: invalid JSON ({err.msg}); each line must be one JSON object."
                                 ) from err
            rows.append(validate_multi_response_row(row, f"{path}:{number}"))
    if not rows:
        raise ValueError(f"{path}: no rows; expected lines like "
                         '{"prompt": ..., "responses": [...], "scores": [...]}.')
    return rows


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a ``.jsonl`` whose rows have a string ``"prompt"`` (SFT, preference and multi-response files
    all do), or from any other text file with one prompt per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Prompts file not found: {path}")
    prompts = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                prompts.append(line.rstrip("\n"))
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: invalid JSON ({err.msg}).") from err
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f'{path}:{number}: expected an object with a string "prompt"; conversations '
                                 '("messages") are not supported here, write their last user turn as "prompt".')
            prompts.append(row["prompt"])
    if not prompts:
        raise ValueError(f"{path}: no prompts found.")
    return prompts


# ------------------------------------------------------------------------------------------------- entry point


def _curve_paths(output_path: Path) -> tuple[Path, Path]:
    stem = output_path.with_suffix("") if output_path.suffix == ".jsonl" else output_path
    return stem.with_name(stem.name + ".curve.json"), stem.with_name(stem.name + ".curve.png")


def run_rejection_sampling(policy: str, reward_model: str, prompts_path: str, output_path: str,
                           tokenizer: str | None = None, template: str = "vicuna_v1.1", k: int = 16,
                           temperature: float = 0.7, top_p: float = 1.0, max_new_tokens: int = 64,
                           curve_ks: list[int] | None = None, verifier: str | None = None, seed: int = 0,
                           unique: bool = True, max_attempts_factor: int = 4, batch_size: int = 64,
                           device: str = "auto") -> dict:
    """Rejection-sample a prompt set with an SFT policy and a reward model (Xwin-LM's RS step).

    Args:
        policy: Lightning checkpoint (.ckpt) of an ``SFTModule``.
        reward_model: Lightning checkpoint (.ckpt) of a ``RewardModel``.
        prompts_path: ``.jsonl`` with a ``"prompt"`` per row, or a text file with one prompt per line.
        output_path: multi-response jsonl to write; ``<output>.curve.json`` and ``<output>.curve.png`` go next to it.
        tokenizer: tokenizer spec for ``load_tokenizer``; None uses the policy module's own tokenizer.
        template: chat template name or file (``templates.get_template``) the policy and the reward model were
            trained with: it builds the generation prompts and the texts the reward model scores.
        k: responses per prompt.
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus mass.
        max_new_tokens: response length cap.
        curve_ks: k values of the best-of-k curve (default 1, 4, 16 and k); values above k are dropped.
        verifier: ``"arithmetic"`` adds ground-truth ``correct`` labels and an accuracy curve.
        seed: sampling seed.
        unique: deduplicate responses per prompt (Xwin's "unique responses").
        max_attempts_factor: draw budget per prompt for uniqueness, in multiples of k.
        batch_size: sequences per generation forward pass (also the scoring chunk size).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...

    Returns:
        summary dict: rows, mean_unique, num_short, draws, truncated, curves, and the written paths.
    """
    from lightning_plugins.modules.align.loading import load_tokenizer
    from lightning_plugins.modules.align.reward_model import RewardModel
    from lightning_plugins.modules.align.sft import SFTModule
    from lightning_plugins.modules.align.templates import get_template

    for name, value in (("policy", policy), ("reward_model", reward_model), ("prompts_path", prompts_path)):
        if not Path(value).is_file():
            raise FileNotFoundError(f"`{name}` file not found: {value}")
    verifiers = ("arithmetic",)
    if verifier is not None and verifier not in verifiers:
        raise ValueError(f"`verifier` must be None or one of {verifiers}, got {verifier!r}.")
    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    output = Path(output_path)
    curve_json, curve_png = _curve_paths(output)

    prompts = load_prompts(prompts_path)
    log.info("rejection-sample: %d prompts from %s", len(prompts), prompts_path)
    sft = SFTModule.load_from_checkpoint(policy, map_location="cpu", weights_only=True)
    rm = RewardModel.load_from_checkpoint(reward_model, map_location="cpu", weights_only=True)
    sft.eval().to(target)
    rm.eval().to(target)
    log.info("rejection-sample: loaded policy %s and reward model %s on %s", policy, reward_model, target)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else sft.tokenizer
    chat = get_template(template)
    check = None
    if verifier == "arithmetic":
        from lightning_plugins.modules.align.arithmetic import ArithmeticVerifier

        check = ArithmeticVerifier()

    rows, stats = rejection_sample(
        sft.model, tok, prompts, lambda p, r: rm.score_texts(p, r, chat), k,
        encode_prompt=lambda text: chat.prompt_ids(tok, text), verifier=check, temperature=temperature,
        top_p=top_p, max_new_tokens=max_new_tokens, unique=unique, max_attempts_factor=max_attempts_factor,
        batch_size=batch_size, score_batch_size=batch_size, seed=seed, return_stats=True)
    write_jsonl(rows, output)
    log.info("rejection-sample: wrote %d rows to %s", len(rows), output)

    ks = sorted({c for c in (curve_ks or [1, 4, 16, k]) if c <= k})
    curves = {"best score": best_of_k_curve(rows, ks, metric="score")}
    if check is not None:
        curves = {"accuracy": best_of_k_curve(rows, ks, metric="correct"), **curves}
    curve_json.write_text(json.dumps({"draws": "without_replacement", "k": k,
                                      "curves": {n: {str(c): v for c, v in pts.items()} for n, pts in curves.items()}},
                                     indent=2) + "\n", encoding="utf-8")
    plot_best_of_k(curves, curve_png, title=f"best-of-k ({len(rows)} prompts, K={k})")
    for name, points in curves.items():
        log.info("rejection-sample: best-of-k %s: %s", name, ", ".join(f"{c}: {v:.4f}" for c, v in points.items()))
    return {"rows": len(rows), "mean_unique": stats.mean_unique, "num_short": stats.num_short, "draws": stats.draws,
            "truncated": stats.truncated, "curves": curves, "output": str(output), "curve_json": str(curve_json),
            "curve_png": str(curve_png)}
