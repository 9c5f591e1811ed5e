"""PairBuilder: preference pairs from multi-response rows, against hand-computed expectations."""

from __future__ import annotations

import json
import logging

import pytest

from lightning_plugins.modules.align.pairs import PAIR_STRATEGIES, build_pairs, run_build_pairs

# scores: b and c tie for best (b comes first), d is the worst; a and c are correct
ROW = {"prompt": "p", "responses": ["a", "b", "c", "d"], "scores": [1.0, 3.0, 3.0, 0.5],
       "correct": [True, False, True, False]}
SINGLE = {"prompt": "q", "responses": ["only"], "scores": [2.0], "correct": [True]}
FLAT = {"prompt": "r", "responses": ["x", "y"], "scores": [1.0, 1.0], "correct": [True, True]}


def pair(chosen, rejected, prompt="p", margin=None):
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return out if margin is None else {**out, "margin": margin}


def test_best_vs_worst_and_skips_are_counted(caplog):
    with caplog.at_level(logging.WARNING, logger="lightning_plugins.modules.align.pairs"):
        pairs, stats = build_pairs([ROW, SINGLE, FLAT], with_margin=True, return_stats=True)
    assert pairs == [pair("b", "d", margin=2.5)]  # first occurrence of the tied best
    assert (stats.rows, stats.pairs, stats.skipped_single, stats.skipped_gap, stats.skipped) == (3, 1, 1, 1, 2)
    assert "skipped 2 of 3 rows" in caplog.text
    assert build_pairs([ROW], min_score_gap=2.5) == []  # gap 2.5 is not > 2.5
    assert build_pairs([ROW], min_score_gap=2.4) == [pair("b", "d")]


def test_best_vs_rank():
    # ranking (ties by position): b(3), c(3), a(1), d(0.5)
    pairs, stats = build_pairs([ROW], "best_vs_rank:2", return_stats=True)
    assert pairs == [] and stats.skipped_gap == 1  # b vs c: gap 0
    assert build_pairs([ROW], "best_vs_rank:3", with_margin=True) == [pair("b", "a", margin=2.0)]
    assert build_pairs([ROW], "best_vs_rank:4") == [pair("b", "d")]
    pairs, stats = build_pairs([ROW], "best_vs_rank:5", return_stats=True)
    assert pairs == [] and stats.skipped_too_few == 1


def test_best_vs_random_draws_only_eligible_and_is_seeded():
    seen = set()
    for seed in range(40):
        (p,) = build_pairs([ROW], "best_vs_random", seed=seed)
        assert p["chosen"] == "b"
        seen.add(p["rejected"])
        assert build_pairs([ROW], "best_vs_random", seed=seed) == [p]
    assert seen == {"a", "d"}  # c ties with the best: never eligible at min_score_gap 0
    assert build_pairs([ROW], "best_vs_random", min_score_gap=1.0) == [pair("b", "d")]
    pairs, stats = build_pairs([FLAT], "best_vs_random", return_stats=True)
    assert pairs == [] and stats.skipped_gap == 1


def test_all_pairs():
    expected = [pair("b", "a"), pair("c", "a"), pair("a", "d"), pair("b", "d"), pair("c", "d")]  # b-c tie dropped
    assert build_pairs([ROW], "all_pairs") == expected
    assert build_pairs([ROW], "all_pairs", min_score_gap=1.0) == [pair("b", "a"), pair("c", "a"), pair("b", "d"),
                                                                   pair("c", "d")]
    pairs, stats = build_pairs([FLAT, SINGLE], "all_pairs", return_stats=True)
    assert pairs == [] and stats.skipped_gap == 1 and stats.skipped_single == 1


def test_verified_pairs():
    # best-scored correct: c (3.0); best-scored incorrect: b (3.0, the hardest negative): margin 0 is allowed
    assert build_pairs([ROW], "verified", with_margin=True) == [pair("c", "b", margin=0.0)]
    low = {**ROW, "correct": [True, True, False, False]}  # correct a(1), b(3); incorrect c(3), d(0.5)
    assert build_pairs([low], "verified", with_margin=True) == [pair("b", "c", margin=0.0)]
    wrong_rm = {**ROW, "correct": [True, False, False, False]}  # the RM prefers an incorrect answer: kept
    assert build_pairs([wrong_rm], "verified", with_margin=True, min_score_gap=5.0) == [pair("a", "b", margin=-2.0)]
    pairs, stats = build_pairs([FLAT, SINGLE], "verified", return_stats=True)
    assert pairs == [] and stats.skipped_unverifiable == 1 and stats.skipped_single == 1
    with pytest.raises(ValueError, match="no 'correct'"):
        build_pairs([{"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}], "verified")


def test_identical_texts_are_skipped():
    dup = {"prompt": "p", "responses": ["x", "x", "y"], "scores": [2.0, 0.0, 1.0]}
    pairs, stats = build_pairs([dup], return_stats=True)
    assert pairs == [] and stats.skipped_identical == 1
    assert build_pairs([dup], "best_vs_rank:2") == [pair("x", "y")]


def test_strategy_and_input_errors():
    with pytest.raises(ValueError, match="best_vs_worst") as err:
        build_pairs([ROW], "best_vs_min")
    assert all(name in str(err.value) for name in PAIR_STRATEGIES)
    for bad in ("best_vs_rank:1", "best_vs_rank:x", "best_vs_rank:", "best_vs_rank:k"):
        with pytest.raises(ValueError):
            build_pairs([ROW], bad)
    with pytest.raises(ValueError, match="min_score_gap"):
        build_pairs([ROW], min_score_gap=-1)
    with pytest.raises(ValueError, match=r"rows\[1\].*2 responses but 1 scores"):
        build_pairs([ROW, {"prompt": "p", "responses": ["a", "b"], "scores": [1.0]}])
    before = json.dumps(ROW)
    build_pairs([ROW, {"prompt": "p", "responses": ["a", "b"], "scores": [1.0, 0.0]}])
    assert json.dumps(ROW) == before  # input rows are not modified


def test_run_build_pairs_files(tmp_path):
    source = tmp_path / "rs.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in (ROW, SINGLE, FLAT)) + "\n", encoding="utf-8")
    summary = run_build_pairs(str(source), str(tmp_path / "out" / "pairs.jsonl"), "verified", with_margin=True)
    assert summary["pairs"] == 1 and summary["skipped"] == 2
    lines = (tmp_path / "out" / "pairs.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [pair("c", "b", margin=0.0)]
    with pytest.raises(ValueError, match="No pairs"):
        run_build_pairs(str(source), str(tmp_path / "none.jsonl"), min_score_gap=100.0)


def test_empty_responses_are_left_out_and_counted():
    rows = [{"prompt": "p", "responses": ["", "a", " ", "b"], "scores": [-5.0, 2.0, -9.0, 1.0],
             "correct": [False, True, False, False]}]
    pairs, stats = build_pairs(rows, "best_vs_worst", return_stats=True)
    assert pairs == [{"prompt": "p", "chosen": "a", "rejected": "b"}] and stats.dropped_empty == 2
    pairs, stats = build_pairs(rows, "verified", return_stats=True)
    assert pairs == [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    pairs, stats = build_pairs([{"prompt": "p", "responses": ["", "a"], "scores": [1.0, 0.0]}], return_stats=True)
    assert pairs == [] and stats.skipped_single == 1 and stats.dropped_empty == 1
