"""Face verification metrics over cosine scores of pairs: AUC, EER, TAR@FAR and insightface's 10-fold accuracy.

Scores are cosine similarities in [-1, 1]. The torchmetrics ROC family treats scores outside [0, 1] as logits (it
applies a sigmoid), so it is fed ``(cos + 1) / 2`` and reported thresholds are mapped back to cosines.

``VerificationMetrics`` keeps every score with its global pair index (``dist_reduce_fx="cat"``); ``compute`` sorts by
that index and drops the duplicates a ``DistributedSampler`` pads with, so the DDP result equals the single-process one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_roc,
    binary_sensitivity_at_specificity,
)
from torchmetrics.utilities import dim_zero_cat

__all__ = ["cosine_scores", "ten_fold_accuracy", "VerificationMetrics"]

_RANGE_TOL = 1e-6


def cosine_scores(embeddings_a: Tensor, embeddings_b: Tensor) -> Tensor:
    """Cosine similarity of matching rows: ``[N, d], [N, d] -> [N]`` (the embeddings are L2-normalised here)."""
    if embeddings_a.ndim != 2 or embeddings_a.shape != embeddings_b.shape:
        raise ValueError(
            f"expected two [N, d] embedding tensors of the same shape, got {tuple(embeddings_a.shape)} "
            f"and {tuple(embeddings_b.shape)}"
        )
    a = F.normalize(embeddings_a, dim=1)
    b = F.normalize(embeddings_b, dim=1)
    return (a * b).sum(dim=1).clamp(-1.0, 1.0)


def _fold_bounds(n: int, folds: int) -> list[tuple[int, int]]:
    """Contiguous fold boundaries as sklearn's ``KFold(folds, shuffle=False)``: the first ``n % folds`` get one more."""
    sizes = [n // folds + (1 if k < n % folds else 0) for k in range(folds)]
    starts = np.cumsum([0] + sizes)
    return [(int(starts[k]), int(starts[k + 1])) for k in range(folds)]


def ten_fold_accuracy(scores: Tensor, issame: Tensor, folds: int = 10) -> tuple[float, float, float]:
    """insightface's verification accuracy over cosine ``scores`` in file order.

    Distance ``d = 2 - 2 cos``, thresholds ``arange(0, 4, 0.01)``, "same" when ``d < threshold``; contiguous folds; for
    each fold the (first) best threshold on the other folds is applied to it. Returns (mean accuracy, std (ddof=0),
    mean best threshold as a cosine).
    """
    s = torch.as_tensor(scores).detach().cpu().double().numpy().reshape(-1)
    y = torch.as_tensor(issame).detach().cpu().numpy().reshape(-1).astype(bool)
    n = s.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"scores and issame differ in length ({n} vs {y.shape[0]})")
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if n < folds:
        raise ValueError(f"{folds}-fold accuracy needs at least {folds} pairs, got {n}")

    dist = 2.0 - 2.0 * s
    thresholds = np.arange(0, 4, 0.01)
    # correct[k, t]: pairs of fold k classified correctly at thresholds[t] (integer counts, so exact).
    bounds = _fold_bounds(n, folds)
    correct = np.empty((folds, thresholds.size), dtype=np.int64)
    for k, (lo, hi) in enumerate(bounds):
        d, same = dist[lo:hi], y[lo:hi]
        pos = np.sort(d[same])
        neg = np.sort(d[~same])
        pos_below = np.searchsorted(pos, thresholds, side="left")  # true accepts: d < threshold
        neg_below = np.searchsorted(neg, thresholds, side="left")  # false accepts
        correct[k] = pos_below + (neg.size - neg_below)
    sizes = np.array([hi - lo for lo, hi in bounds])
    total = correct.sum(axis=0)

    accuracies = np.empty(folds)
    best = np.empty(folds)
    for k in range(folds):
        train_acc = (total - correct[k]) / (n - sizes[k])
        t = int(np.argmax(train_acc))
        best[k] = thresholds[t]
        accuracies[k] = correct[k, t] / sizes[k]
    return float(np.mean(accuracies)), float(np.std(accuracies)), float(np.mean(1.0 - best / 2.0))


class VerificationMetrics(Metric):
    """AUC, EER, TAR@FAR (default FARs 1e-3 and 1e-4) and the 10-fold best-threshold accuracy over cosine scores.

    ``update(scores, issame, indices)``: pass the global pair indices under DDP so that ``compute`` restores the file
    order and drops sampler padding (exact). Without them a per-process running counter is used (exact single-process).
    ``compute`` returns ``auc``, ``eer``, ``eer_threshold`` (cosine), ``acc``, ``acc_std``, ``threshold`` (cosine; mean
    best 10-fold threshold) and ``tar@far={far:.0e}`` per FAR (NaN, with a warning, when too few negatives to measure).
    ``forward`` only updates (a per-batch value is meaningless here) and returns None.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, fars: Sequence[float] = (1e-3, 1e-4), folds: int = 10, **kwargs) -> None:
        super().__init__(**kwargs)
        fars = tuple(float(f) for f in fars)
        if any(not 0.0 < f < 1.0 for f in fars):
            raise ValueError(f"fars must lie in (0, 1), got {fars}")
        if int(folds) < 2:
            raise ValueError(f"folds must be at least 2, got {folds}")
        self.fars = fars
        self.folds = int(folds)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("issame", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")
        # Counts of updates with/without explicit indices (to refuse a mix, and to skip de-duplication of counters).
        self.add_state("n_indexed", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("n_auto", default=torch.tensor(0), dist_reduce_fx="sum")
        self._counter = 0

    def update(self, scores: Tensor, issame: Tensor, indices: Tensor | None = None) -> None:
        """Add cosine ``scores`` [N], labels ``issame`` [N] (bool or 0/1) and optional global pair ``indices`` [N]."""
        scores = torch.as_tensor(scores)
        issame = torch.as_tensor(issame, device=scores.device)
        if scores.ndim != 1 or issame.ndim != 1:
            raise ValueError(
                f"scores and issame must be 1-D, got shapes {tuple(scores.shape)} and {tuple(issame.shape)}"
            )
        n = scores.shape[0]
        if issame.shape[0] != n:
            raise ValueError(f"scores and issame differ in length ({n} vs {issame.shape[0]})")
        if not scores.is_floating_point():
            raise ValueError(f"scores must be floating-point cosine similarities, got dtype {scores.dtype}")
        if n:
            if not torch.isfinite(scores).all():
                raise ValueError("scores must be finite cosine similarities in [-1, 1]; got NaN or inf")
            lo, hi = scores.min().item(), scores.max().item()
            if lo < -1 - _RANGE_TOL or hi > 1 + _RANGE_TOL:
                raise ValueError(
                    f"scores must be cosine similarities in [-1, 1]; got values in [{lo:.6g}, {hi:.6g}] "
                    "(use cosine_scores(embeddings_a, embeddings_b))"
                )
            if issame.dtype != torch.bool and not ((issame == 0) | (issame == 1)).all():
                raise ValueError("issame must be bool or 0/1")
        if indices is None:
            if self.n_indexed > 0:
                raise ValueError("pass indices to every update or to none (this metric already got indexed updates)")
            indices = torch.arange(self._counter, self._counter + n, device=scores.device)
            self._counter += n
            self.n_auto += 1
        else:
            if self.n_auto > 0:
                raise ValueError("pass indices to every update or to none (this metric already got unindexed updates)")
            indices = torch.as_tensor(indices, device=scores.device)
            if indices.ndim != 1 or indices.shape[0] != n:
                raise ValueError(f"indices must be 1-D of length {n}, got shape {tuple(indices.shape)}")
            if indices.is_floating_point() or indices.dtype == torch.bool:
                raise ValueError(f"indices must be integer pair indices, got dtype {indices.dtype}")
            self.n_indexed += 1
        self.scores.append(scores.detach())
        self.issame.append(issame.detach().bool())
        self.indices.append(indices.detach().long())

    def forward(self, *args, **kwargs) -> None:
        """Update only (the metrics need the whole set; a per-batch value would be meaningless)."""
        self.update(*args, **kwargs)

    def reset(self) -> None:
        super().reset()
        self._counter = 0

    def _gathered(self) -> tuple[Tensor, Tensor]:
        """Scores (float64) and labels in pair-index order, duplicates of an index dropped (first kept)."""
        if isinstance(self.scores, list) and not self.scores:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
        scores = dim_zero_cat(self.scores).double()
        issame = dim_zero_cat(self.issame).bool()
        indices = dim_zero_cat(self.indices).long()
        order = torch.sort(indices, stable=True).indices
        scores, issame, indices = scores[order], issame[order], indices[order]
        if self.n_auto == 0 and indices.numel() > 1:
            keep = torch.ones_like(indices, dtype=torch.bool)
            keep[1:] = indices[1:] != indices[:-1]
            scores, issame = scores[keep], issame[keep]
        return scores, issame

    def compute(self) -> dict[str, Tensor]:
        """All metrics as 0-d float32 tensors on the metric's device (see the class docstring for the keys)."""
        scores, issame = self._gathered()
        if self.n_auto > 0 and torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                warnings.warn(
                    "VerificationMetrics got no pair indices under DDP: sampler padding is counted and the 10-fold "
                    "split is not in file order (pass update(..., indices=global_pair_indices) for exact results)",
                    UserWarning,
                    stacklevel=2,
                )
        n = scores.numel()
        if n < self.folds:
            raise ValueError(f"VerificationMetrics needs at least folds={self.folds} pairs, got {n}")
        num_pos = int(issame.sum())
        num_neg = n - num_pos
        if num_pos == 0 or num_neg == 0:
            raise ValueError(
                "VerificationMetrics needs both positive and negative pairs, "
                f"got {num_pos} same and {num_neg} different"
            )

        prob = ((scores + 1.0) / 2.0).clamp(0.0, 1.0)  # in [0, 1]: torchmetrics must not apply a sigmoid
        target = issame.long()
        out: dict[str, float] = {"auc": float(binary_auroc(prob, target))}
        fpr, tpr, thr = binary_roc(prob, target)
        eer_idx = int(torch.argmin(torch.abs(fpr - (1 - tpr))))  # as torchmetrics' BinaryEER
        out["eer"] = float((fpr[eer_idx] + 1 - tpr[eer_idx]) / 2)
        out["eer_threshold"] = float(2.0 * thr[eer_idx] - 1.0)
        acc, acc_std, threshold = ten_fold_accuracy(scores, issame, self.folds)
        out.update(acc=acc, acc_std=acc_std, threshold=threshold)

        unmeasurable = []
        for far in self.fars:
            key = f"tar@far={far:.0e}"
            needed = math.ceil(1.0 / far * (1 - 1e-9))
            if num_neg < needed:
                unmeasurable.append(f"FAR={far:.0e} needs at least {needed} negative pairs")
                out[key] = float("nan")
                continue
            # Half a FPR step of slack so that a FPR exactly equal to far counts despite float rounding.
            min_spec = max(0.0, 1.0 - far - 0.5 / num_neg)
            tar, _ = binary_sensitivity_at_specificity(prob, target, min_specificity=min_spec)
            out[key] = float(tar)
        if unmeasurable:
            warnings.warn(
                f"TAR@FAR not measurable with {num_neg} negative pairs: " + "; ".join(unmeasurable) + " (reported NaN)",
                UserWarning,
                stacklevel=2,
            )
        return {k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in out.items()}
