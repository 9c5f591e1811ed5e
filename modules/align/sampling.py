"""Rejection sampling (Xwin-LM's RS step): K unique samples per prompt, reward scores, best-of-k curves.

- :func:`~lightning_plugins.modules.align.generation.sample_responses` (in :mod:`.generation`): K samples per
  prompt from a Hugging Face causal LM (own batched sampling loop with a KV cache, left padding and a seeded
  ``torch.Generator``: pure temperature / top-p sampling from the policy, no ``generation_config`` defaults such as
  ``top_k=50`` or repetition penalties leaking in).
- :func:`rejection_sample`: sample, score with a reward callable, keep the best; rows in the multi-response jsonl
  format ``{prompt, responses, scores, best, best_score[, correct]}`` (Xwin-Set style).
- :func:`~lightning_plugins.modules.align.best_of_k.best_of_k_curve` (in :mod:`.best_of_k`): exact expected
  best-of-k accuracy / score by combinatorics over the ranked responses; also ``plot_best_of_k``.
- ``write_jsonl``, ``read_multi_response_jsonl``, ``load_prompts`` (in :mod:`.multi_response`).
- :func:`run_rejection_sampling`: the CLI-friendly entry point (checkpoints in, jsonl + curve files out).

The public names of :mod:`.generation`, :mod:`.best_of_k` and :mod:`.multi_response` are re-exported here.

Tie rule, used everywhere in this module and in :mod:`~lightning_plugins.modules.align.pairs`: among equal scores
the response that comes first in ``responses`` wins.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from lightning_plugins.modules.align._common import check_int as _check_int, first_argmax as _first_argmax
from lightning_plugins.modules.align.best_of_k import DRAWS, METRICS  # noqa: F401 - re-exported constants
from lightning_plugins.modules.align.best_of_k import best_of_k_curve, plot_best_of_k
from lightning_plugins.modules.align.generation import SamplingStats, sample_responses
from lightning_plugins.modules.align.multi_response import (
    load_prompts,
    read_multi_response_jsonl,
    validate_multi_response_row,
    write_jsonl,
)

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


# ------------------------------------------------------------------------------------------- rejection sampling


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
