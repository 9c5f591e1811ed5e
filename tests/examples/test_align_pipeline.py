"""``examples/align_pipeline.py``: SFT -> reward model -> rejection sampling -> DPO on the arithmetic task reaches the
issue's goals on the exact ground truth (the right sum)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "align_pipeline.py"


@pytest.mark.slow
def test_every_stage_improves_on_the_ground_truth(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--output", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| RM held-out pair accuracy |" in done.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    sft, dpo, best_of = report["sft"], report["dpo"], report["rs_best_of_k_correct"]
    print(json.dumps({k: report[k] for k in ("sft", "rm_heldout_pair_accuracy", "rs_best_of_k_correct", "dpo")}))
    # SFT learns the noisy data's answer distribution: P(right sum) near the data's 0.4
    assert 0.3 <= sft["p_correct"] <= 0.5
    assert report["rm_heldout_pair_accuracy"] >= 0.85
    assert best_of["16"] > best_of["1"] + 0.2
    assert dpo["p_correct"] > sft["p_correct"] + 0.05 and dpo["greedy"] >= sft["greedy"]
    assert report["dpo_pairs"]["pairs"] >= 90
    for name in ("report.md", "rs/rs.jsonl", "rs/rs.curve.png", "sft/hf/model.safetensors", "dpo/hf/config.json"):
        assert (tmp_path / name).stat().st_size > 0, name
