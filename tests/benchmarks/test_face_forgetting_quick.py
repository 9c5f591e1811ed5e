"""benchmarks/face_forgetting.py runs end to end in --quick mode (tiny model, 2 tasks of 2 identities, CPU)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "face_forgetting.py"
METHODS = ("gslora", "gslora++", "gslora-4shot", "finetune", "retrain")
NUMBERS = ("acc_f", "acc_r", "h", "acc_f_before", "acc_r_before", "auc_r", "auc_r_before", "auc_f", "auc_f_before",
           "auc_heldout", "auc_heldout_before", "trainable_params", "trainable_ratio", "seconds")


@pytest.mark.slow
def test_quick_mode_writes_every_method_and_task(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(tmp_path),
         "--cache", str(tmp_path / "pretrained.pt")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("results.json", "results.md", "face_forgetting.png"):
        assert (tmp_path / name).is_file(), name
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["threads"] == 1 and data["seed"] == 0
    assert set(data["results"]) == set(METHODS)
    for method, rows in data["results"].items():
        assert [row["task"] for row in rows] == [0, 1], method
        for row in rows:
            for key in NUMBERS:
                assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (method, row["task"], key)
            assert 0 <= row["acc_f"] <= 100 and 0 <= row["acc_r"] <= 100
            # task 1 has the identities forgotten in task 0 as "old" ones
            if row["task"] == 1:
                assert isinstance(row["acc_o"], (int, float)) and math.isfinite(row["acc_o"]), method
    markdown = (tmp_path / "results.md").read_text()
    assert "1 torch thread(s)" in markdown and "seed 0" in markdown.lower()
    for method in METHODS:
        assert f"## {method}" in markdown
