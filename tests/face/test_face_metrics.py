"""Face verification metrics: insightface's 10-fold protocol, AUC/EER/TAR@FAR against sklearn, exactness under DDP."""

import math
import os
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import KFold
from torch.utils.data import DistributedSampler

from lightning_plugins.modules.face.metrics import VerificationMetrics, cosine_scores, ten_fold_accuracy

# --------------------------------------------------------------------------------------------------------------------
# helpers


def _insightface_reference(dist, issame, folds=10):
    """insightface eval/verification.py calculate_roc (accuracy part), plain numpy on squared distances."""
    thresholds = np.arange(0, 4, 0.01)

    def accuracy(threshold, d, actual):
        predict = np.less(d, threshold)
        tp = np.sum(np.logical_and(predict, actual))
        tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(actual)))
        return float(tp + tn) / d.size

    accs, best = np.zeros(folds), np.zeros(folds)
    for k, (train, test) in enumerate(KFold(n_splits=folds, shuffle=False).split(np.arange(len(dist)))):
        acc_train = np.array([accuracy(t, dist[train], issame[train]) for t in thresholds])
        i = np.argmax(acc_train)
        best[k] = thresholds[i]
        accs[k] = accuracy(thresholds[i], dist[test], issame[test])
    return np.mean(accs), np.std(accs), best


def _synthetic(n, seed, pos_mean=0.45, neg_mean=0.05, sigma=0.2):
    """Cosine scores in (-1, 1) from two Gaussian clusters (tanh keeps them in range without ties); labels shuffled."""
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.5
    raw = np.where(issame, rng.normal(pos_mean, sigma, n), rng.normal(neg_mean, sigma, n))
    return np.tanh(raw), issame


def _balanced(n_pos, n_neg, seed):
    rng = np.random.default_rng(seed)
    scores = np.tanh(np.concatenate([rng.normal(0.9, 0.35, n_pos), rng.normal(0.0, 0.35, n_neg)]))
    issame = np.concatenate([np.ones(n_pos, bool), np.zeros(n_neg, bool)])
    perm = rng.permutation(n_pos + n_neg)
    return scores[perm], issame[perm]


def _metric(scores, issame, **kwargs):
    m = VerificationMetrics(**kwargs)
    m.update(torch.as_tensor(scores), torch.as_tensor(issame))
    return m


def _assert_same_results(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) or (a[k].isnan() and b[k].isnan()), (k, a[k], b[k])


# --------------------------------------------------------------------------------------------------------------------
# cosine_scores and ten_fold_accuracy


def test_cosine_scores_normalises():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    expected = torch.nn.functional.cosine_similarity(a, b, dim=1)
    torch.testing.assert_close(cosine_scores(a, b), expected)
    torch.testing.assert_close(cosine_scores(3 * a, 0.1 * b), expected)
    assert cosine_scores(a, a).sub(1).abs().max() < 1e-6
    with pytest.raises(ValueError, match="same shape"):
        cosine_scores(a, b[:3])


@pytest.mark.parametrize("n", [600, 605])  # 605: the first 5 folds get one extra pair, as sklearn's KFold
def test_ten_fold_matches_insightface_reference(n):
    scores, issame = _synthetic(n, seed=n)
    ref_mean, ref_std, ref_best = _insightface_reference(2 - 2 * scores, issame)
    mean, std, threshold = ten_fold_accuracy(torch.from_numpy(scores), torch.from_numpy(issame))
    assert 0.6 < mean < 0.95  # non-trivial: the folds pick different thresholds and accuracies
    assert mean == pytest.approx(ref_mean, abs=1e-12)
    assert std == pytest.approx(ref_std, abs=1e-12)
    assert threshold == pytest.approx(np.mean(1 - ref_best / 2), abs=1e-12)
    assert -1 <= threshold <= 1


def test_ten_fold_from_embeddings_squared_distance():
    """Same protocol as insightface on embeddings: squared L2 distance of unit vectors vs our cosine scores."""
    rng = np.random.default_rng(3)
    n, d = 400, 8
    a = rng.normal(size=(n, d))
    issame = rng.random(n) < 0.5
    b = np.where(issame[:, None], a + rng.normal(scale=1.2, size=(n, d)), rng.normal(size=(n, d)))
    ua = a / np.linalg.norm(a, axis=1, keepdims=True)
    ub = b / np.linalg.norm(b, axis=1, keepdims=True)
    ref_mean, ref_std, _ = _insightface_reference(np.sum(np.square(ua - ub), 1), issame)
    scores = cosine_scores(torch.from_numpy(a), torch.from_numpy(b))
    mean, std, _ = ten_fold_accuracy(scores, torch.from_numpy(issame))
    assert mean == pytest.approx(ref_mean, abs=1e-12)
    assert std == pytest.approx(ref_std, abs=1e-12)


def test_ten_fold_separable_by_hand():
    # 20 pairs alternating same (cos 0.9, d 0.2) / different (cos -0.5, d 3.0): every fold is perfect, and the first
    # best threshold is the smallest one above d = 0.2, i.e. 0.21 -> cosine 1 - 0.21 / 2 = 0.895.
    issame = torch.arange(20) % 2 == 0
    scores = torch.where(issame, 0.9, -0.5).double()
    mean, std, threshold = ten_fold_accuracy(scores, issame)
    assert (mean, std) == (1.0, 0.0)
    assert threshold == pytest.approx(0.895, abs=1e-9)
    with pytest.raises(ValueError, match="at least 10 pairs"):
        ten_fold_accuracy(scores[:9], issame[:9])


# --------------------------------------------------------------------------------------------------------------------
# AUC, EER, TAR@FAR against sklearn / numpy


@pytest.fixture(scope="module")
def big_set():
    return _balanced(10_000, 10_000, seed=7)  # 10,000 negatives: FAR 1e-4 is exactly one false accept


def test_auc_eer_tar_against_sklearn(big_set):
    scores, issame = big_set
    out = _metric(scores, issame).compute()
    assert set(out) == {"auc", "eer", "eer_threshold", "acc", "acc_std", "threshold", "tar@far=1e-03", "tar@far=1e-04"}

    assert out["auc"].item() == pytest.approx(roc_auc_score(issame, scores), abs=1e-6)

    fpr, tpr, thr = roc_curve(issame, scores, drop_intermediate=False)
    i = np.argmin(np.abs(fpr - (1 - tpr)))
    step = 1 / 10_000
    assert out["eer"].item() == pytest.approx((fpr[i] + 1 - tpr[i]) / 2, abs=step)
    assert 0.05 < out["eer"].item() < 0.3
    # the threshold is a cosine, at sklearn's EER point on raw cosines within one step of the curve
    eer_thr = out["eer_threshold"].item()
    assert -1 <= eer_thr <= 1
    assert thr[min(i + 1, len(thr) - 1)] - 1e-6 <= eer_thr <= thr[max(i - 1, 1)] + 1e-6

    for far in (1e-3, 1e-4):
        expected = tpr[fpr <= far].max()  # largest TPR with FPR <= far
        assert out[f"tar@far={far:.0e}"].item() == pytest.approx(expected, abs=1e-6)
    assert out["tar@far=1e-03"] > out["tar@far=1e-04"] > 0

    mean, std, threshold = ten_fold_accuracy(torch.from_numpy(scores), torch.from_numpy(issame))
    assert out["acc"].item() == pytest.approx(mean, abs=1e-6)
    assert out["acc_std"].item() == pytest.approx(std, abs=1e-6)
    assert out["threshold"].item() == pytest.approx(threshold, abs=1e-6)


def test_cosines_are_not_treated_as_logits(big_set):
    """torchmetrics would sigmoid scores outside [0, 1]: the rank metrics must not change under an affine map of the
    cosines into [0, 1], and the EER threshold must stay a cosine (map back through the same affine map)."""
    scores, issame = big_set
    out = _metric(scores, issame).compute()
    shifted = _metric(0.5 * scores + 0.5, issame).compute()  # all in [0, 1]
    for k in ("auc", "eer", "tar@far=1e-03", "tar@far=1e-04"):
        assert out[k].item() == pytest.approx(shifted[k].item(), abs=1e-6), k
    assert out["eer_threshold"].item() == pytest.approx(2 * shifted["eer_threshold"].item() - 1, abs=1e-4)
    # on raw cosines, half of them negative, a sigmoid-space threshold would be > 0.5 here; the cosine one is near 0.45
    fpr, tpr, thr = roc_curve(issame, scores, drop_intermediate=False)
    i = np.argmin(np.abs(fpr - (1 - tpr)))
    assert out["eer_threshold"].item() == pytest.approx(thr[i], abs=1e-3)


def test_float32_scores():
    scores, issame = _synthetic(1_000, seed=11)
    out64 = _metric(scores, issame, fars=(1e-2,)).compute()
    out32 = _metric(scores.astype(np.float32), issame, fars=(1e-2,)).compute()
    for k in out64:
        assert out32[k].item() == pytest.approx(out64[k].item(), abs=2e-3), k


# --------------------------------------------------------------------------------------------------------------------
# DDP exactness


def _rank_batches(n, rank, world_size, batch=64):
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=5)
    idx = torch.tensor(list(sampler))
    return list(idx.split(batch))


def test_ddp_merge_equals_single_process():
    n = 1_001  # odd: DistributedSampler pads rank 1 with a repeated pair
    scores, issame = _synthetic(n, seed=21)
    scores, issame = torch.from_numpy(scores).float(), torch.from_numpy(issame)
    kwargs = dict(fars=(1e-2, 1e-4))

    single = VerificationMetrics(**kwargs)
    for chunk in torch.arange(n).split(100):  # file order, running counter
        single.update(scores[chunk], issame[chunk])
    with pytest.warns(UserWarning, match="10000 negative pairs"):
        expected = single.compute()

    ranks = []
    for rank in range(2):
        m = VerificationMetrics(**kwargs)
        for idx in _rank_batches(n, rank, 2):
            m.update(scores[idx], issame[idx], indices=idx)
        ranks.append(m)
    merged = ranks[0]
    merged.merge_state(ranks[1])  # concatenates the list states, as dist_reduce_fx="cat" does
    assert sum(t.numel() for t in merged.scores) == n + 1  # the padded duplicate is there...
    with pytest.warns(UserWarning):
        result = merged.compute()
    _assert_same_results(result, expected)  # ...and dropped

    # without the de-duplication and re-ordering the result would differ (the test is not vacuous)
    naive = VerificationMetrics(**kwargs)
    for m in ranks[::-1]:
        naive.update(torch.cat(m.scores), torch.cat(m.issame))
    with pytest.warns(UserWarning):
        assert naive.compute()["acc"] != expected["acc"]


def _ddp_worker(rank, world_size, store, out_dir, n):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        scores, issame = _synthetic(n, seed=21)
        scores, issame = torch.from_numpy(scores).float(), torch.from_numpy(issame)
        m = VerificationMetrics(fars=(1e-2,))
        for idx in _rank_batches(n, rank, world_size):
            m.update(scores[idx], issame[idx], indices=idx)
        torch.save(m.compute(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_process_gloo(tmp_path):
    n = 1_001
    start = time.time()
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path), n), nprocs=2, join=True)
    elapsed = time.time() - start
    scores, issame = _synthetic(n, seed=21)
    expected = _metric(torch.from_numpy(scores).float(), issame, fars=(1e-2,)).compute()
    for rank in range(2):
        _assert_same_results(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True), expected)
    assert elapsed < 120


# --------------------------------------------------------------------------------------------------------------------
# errors, warnings, API behaviour


def test_errors():
    scores, issame = _synthetic(200, seed=1)
    scores, issame = torch.from_numpy(scores), torch.from_numpy(issame)
    m = VerificationMetrics()
    with pytest.raises(ValueError, match=r"cosine similarities in \[-1, 1\]; got values in \[0, 1.5\]"):
        m.update(torch.tensor([0.0, 1.5]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="finite"):
        m.update(torch.tensor([0.0, float("nan")]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="differ in length"):
        m.update(scores, issame[:-1])
    with pytest.raises(ValueError, match="1-D"):
        m.update(scores[:10].view(2, 5), issame[:10].view(2, 5))
    m.update(torch.tensor([1.0 + 1e-7, -1.0 - 1e-7]), torch.tensor([True, False]))  # rounding slack is accepted

    m = VerificationMetrics()
    m.update(scores[:9], issame[:9])
    with pytest.raises(ValueError, match="at least folds=10 pairs, got 9"):
        m.compute()
    with pytest.raises(ValueError, match="at least folds=10 pairs, got 0"):
        VerificationMetrics().compute()

    m = VerificationMetrics()
    m.update(scores[:50], torch.ones(50, dtype=torch.bool))
    with pytest.raises(ValueError, match="both positive and negative"):
        m.compute()

    m = VerificationMetrics()
    m.update(scores[:5], issame[:5], indices=torch.arange(5))
    with pytest.raises(ValueError, match="indices to every update or to none"):
        m.update(scores[5:10], issame[5:10])


def test_unmeasurable_far_is_nan_with_warning():
    scores, issame = _balanced(100, 1_000, seed=2)
    m = _metric(scores, issame, fars=(1e-3, 1e-4))
    with pytest.warns(UserWarning, match="1000 negative pairs.*10000 negative pairs") as record:
        out = m.compute()
    assert len([w for w in record if "TAR@FAR" in str(w.message)]) == 1
    assert not math.isnan(out["tar@far=1e-03"].item())  # 1,000 negatives: FAR 1e-3 is exactly one false accept
    assert math.isnan(out["tar@far=1e-04"].item())


def test_forward_accumulates_and_reset_restarts_counter():
    scores, issame = _synthetic(300, seed=4)
    scores, issame = torch.from_numpy(scores), torch.from_numpy(issame)
    m = VerificationMetrics(fars=(1e-2,))
    for chunk in torch.arange(300).split(32):
        assert m(scores[chunk], issame[chunk]) is None
    expected = _metric(scores, issame, fars=(1e-2,)).compute()
    _assert_same_results(m.compute(), expected)
    m.reset()
    m.update(scores, issame)
    _assert_same_results(m.compute(), expected)
