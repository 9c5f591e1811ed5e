"""Preference pairs from multi-response rows (Xwin-Set -> DPO data): :func:`build_pairs`.

Strategies (chosen is always the top-scored response, first occurrence among ties, except for ``"verified"``):

- ``"best_vs_worst"``: rejected = the lowest-scored response (first occurrence among ties).
- ``"best_vs_rank:k"``: rejected = the k-th best (1-based: ``rank:2`` is the second best); rows with fewer than
  k responses are skipped.
- ``"best_vs_random"``: rejected = uniform among the responses whose gap to the best is > ``min_score_gap``.
- ``"all_pairs"``: every pair (i < j in file order) with |score gap| > ``min_score_gap``; chosen = the higher.
- ``"verified"``: needs ``"correct"`` labels; chosen = best-scored correct response, rejected = best-scored
  incorrect one (the hardest negative: verifier-labelled on-policy pairs). The label is correctness, so
  ``min_score_gap`` does not apply; rows without both a correct and an incorrect response are skipped.

Every skipped row is counted in :class:`PairStats` (returned with ``return_stats=True`` and logged).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lightning_plugins.modules.align.multi_response import (
    read_multi_response_jsonl,
    validate_multi_response_row,
    write_jsonl,
)

__all__ = ["PAIR_STRATEGIES", "PairStats", "build_pairs", "run_build_pairs"]

log = logging.getLogger(__name__)

PAIR_STRATEGIES = ("best_vs_worst", "best_vs_rank:k", "best_vs_random", "all_pairs", "verified")


@dataclass
class PairStats:
    """Counts of :func:`build_pairs`: rows in, pairs out, and rows skipped by reason."""

    rows: int = 0
    pairs: int = 0
    skipped_single: int = 0
    """Rows with a single response."""
    skipped_gap: int = 0
    """Rows where no candidate pair has a score gap > ``min_score_gap``."""
    skipped_too_few: int = 0
    """``best_vs_rank:k`` rows with fewer than k responses."""
    skipped_unverifiable: int = 0
    """``verified`` rows whose responses are all correct or all incorrect."""
    skipped_identical: int = 0
    """Rows whose chosen and rejected texts are equal (duplicate responses)."""
    dropped_empty: int = 0
    """Empty (whitespace-only) responses left out before pairing: a DPO pair cannot have an empty completion."""

    @property
    def skipped(self) -> int:
        return (self.skipped_single + self.skipped_gap + self.skipped_too_few + self.skipped_unverifiable
                + self.skipped_identical)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "skipped": self.skipped}


def _parse_strategy(strategy: str) -> tuple[str, int | None]:
    if not isinstance(strategy, str):
        raise TypeError(f"`strategy` must be a string, one of {PAIR_STRATEGIES}, got {strategy!r}.")
    if strategy.startswith("best_vs_rank:"):
        value = strategy.split(":", 1)[1]
        if not value.isdigit() or int(value) < 2:
            raise ValueError(f"`strategy` {strategy!r}: the rank must be an integer >= 2 (1-based; rank 2 is the "
                             "second best), e.g. 'best_vs_rank:2'.")
        return "best_vs_rank", int(value)
    if strategy not in PAIR_STRATEGIES or strategy == "best_vs_rank:k":
        raise ValueError(f"Unknown pair strategy {strategy!r}; choose one of {PAIR_STRATEGIES} "
                         "(with k an integer >= 2 in 'best_vs_rank:k').")
    return strategy, None


def _ranked(scores: Sequence[float], among: Sequence[int] | None = None) -> list[int]:
    """Indices by descending score, the earlier index first among ties."""
    indices = range(len(scores)) if among is None else among
    return sorted(indices, key=lambda i: (-scores[i], i))


def build_pairs(rows: Sequence[Mapping[str, Any]], strategy: str = "best_vs_worst", min_score_gap: float = 0.0,
                seed: int = 0, *, with_margin: bool = False, return_stats: bool = False
                ) -> list[dict] | tuple[list[dict], PairStats]:
    """Turn multi-response rows ``{prompt, responses, scores[, correct]}`` into preference rows.

    Args:
        rows: multi-response rows (validated as in ``read_multi_response_jsonl``).
        strategy: one of :data:`PAIR_STRATEGIES` (see the module docstring).
        min_score_gap: a pair is kept only when chosen score - rejected score > this (not for ``"verified"``).
        seed: seeds ``best_vs_random`` (one ``random.Random(seed)`` consumed in row order).
        with_margin: add ``"margin"`` = chosen score - rejected score (negative possible for ``"verified"``).
        return_stats: also return the :class:`PairStats`.

    Returns:
        preference rows ``{prompt, chosen, rejected[, margin]}``, in row order.
    """
    name, rank = _parse_strategy(strategy)
    if isinstance(min_score_gap, bool) or not isinstance(min_score_gap, (int, float)) or min_score_gap < 0:
        raise ValueError(f"`min_score_gap` must be a number >= 0, got {min_score_gap!r}.")
    rng = random.Random(seed)
    stats = PairStats()
    pairs: list[dict] = []

    def emit(row: Mapping[str, Any], chosen: int, rejected: int) -> bool:
        responses, scores = row["responses"], row["scores"]
        if responses[chosen] == responses[rejected]:
            stats.skipped_identical += 1
            return False
        pair = {"prompt": row["prompt"], "chosen": responses[chosen], "rejected": responses[rejected]}
        if with_margin:
            pair["margin"] = float(scores[chosen] - scores[rejected])
        pairs.append(pair)
        return True

    for i, row in enumerate(rows):
        row = _without_empty(validate_multi_response_row(dict(row), f"rows[{i}]"), stats)
        stats.rows += 1
        scores = row["scores"]
        n = len(scores)
        if name == "verified":
            if "correct" not in row:
                raise ValueError(f"rows[{i}] has no 'correct' labels; strategy 'verified' needs rows written by "
                                 "rejection sampling with a verifier.")
            good = [j for j in range(n) if row["correct"][j]]
            bad = [j for j in range(n) if not row["correct"][j]]
            if n < 2:
                stats.skipped_single += 1
            elif not good or not bad:
                stats.skipped_unverifiable += 1
            else:
                emit(row, _ranked(scores, good)[0], _ranked(scores, bad)[0])
            continue
        if n < 2:
            stats.skipped_single += 1
            continue
        order = _ranked(scores)
        best = order[0]
        if name == "all_pairs":
            found = [(a, b) for a in range(n) for b in range(a + 1, n) if abs(scores[a] - scores[b]) > min_score_gap]
            if not found:
                stats.skipped_gap += 1
            for a, b in found:
                emit(row, a, b) if scores[a] > scores[b] else emit(row, b, a)
            continue
        if name == "best_vs_rank":
            if n < rank:
                stats.skipped_too_few += 1
                continue
            rejected = order[rank - 1]
        elif name == "best_vs_worst":
            rejected = min(range(n), key=lambda j: (scores[j], j))
        else:  # best_vs_random
            eligible = [j for j in range(n) if scores[best] - scores[j] > min_score_gap]
            if not eligible:
                stats.skipped_gap += 1
                continue
            rejected = eligible[rng.randrange(len(eligible))]
        if scores[best] - scores[rejected] <= min_score_gap:
            stats.skipped_gap += 1
            continue
        emit(row, best, rejected)

    stats.pairs = len(pairs)
    if stats.dropped_empty:
        log.warning("pairs (%s): left out %d empty responses", strategy, stats.dropped_empty)
    if stats.skipped:
        log.warning("pairs (%s): skipped %d of %d rows (%s)", strategy, stats.skipped, stats.rows,
                    ", ".join(f"{k}={v}" for k, v in stats.as_dict().items() if k.startswith("skipped_") and v))
    log.info("pairs (%s): %d pairs from %d rows", strategy, stats.pairs, stats.rows)
    return (pairs, stats) if return_stats else pairs


def run_build_pairs(input_path: str, output_path: str, strategy: str = "best_vs_worst", min_score_gap: float = 0.0,
                    seed: int = 0, with_margin: bool = False) -> dict:
    """Read a multi-response jsonl, build pairs with :func:`build_pairs`, write a preference jsonl.

    Returns the :class:`PairStats` counts as a dict plus ``output``.
    """
    rows = read_multi_response_jsonl(input_path)
    pairs, stats = build_pairs(rows, strategy, min_score_gap, seed, with_margin=with_margin, return_stats=True)
    if not pairs:
        raise ValueError(f"No pairs built from {input_path} with strategy {strategy!r} and min_score_gap="
                         f"{min_score_gap} ({json.dumps(stats.as_dict())}); lower min_score_gap or pick another "
                         "strategy.")
    write_jsonl(pairs, output_path)
    return {**stats.as_dict(), "output": str(Path(output_path))}


def _without_empty(row: dict, stats: PairStats) -> dict:
    """The row without its empty responses (and their scores / labels), counting them in ``stats``."""
    keep = [j for j, text in enumerate(row["responses"]) if text.strip()]
    if len(keep) == len(row["responses"]):
        return row
    stats.dropped_empty += len(row["responses"]) - len(keep)
    out = dict(row)
    for key in ("responses", "scores", "correct"):
        if key in row:
            out[key] = [row[key][j] for j in keep]
    return out
