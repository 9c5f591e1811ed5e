"""Best-of-k curves of multi-response rows: :func:`best_of_k_curve` (exact, by combinatorics over the ranked
responses) and :func:`plot_best_of_k`."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_plugins.modules.align._common import check_int as _check_int
from lightning_plugins.modules.align.multi_response import validate_multi_response_row

__all__ = ["best_of_k_curve", "plot_best_of_k"]

log = logging.getLogger(__name__)

DRAWS = ("without_replacement", "with_replacement")
METRICS = ("correct", "score")



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
