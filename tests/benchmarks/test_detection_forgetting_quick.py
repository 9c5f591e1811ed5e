"""benchmarks/detection_forgetting.py runs end to end in --quick mode (tiny FCOS-TE, 1 task of 1 category, CPU)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "detection_forgetting.py"
METHODS = ("gslora", "finetune", "gslora-paper")
NUMBERS = ("ap_f", "ap_r", "ap_f_before", "ap_r_before", "drop", "h", "map", "trainable_params", "trainable_ratio",
           "seconds")
GSLORA_NUMBERS = ("map_unmerged", "merge_diff")


@pytest.mark.slow
def test_quick_mode_writes_every_method_and_task(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(tmp_path), "--methods",
         ",".join(METHODS)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("results.json", "results.md", "detection_forgetting.png"):
        assert (tmp_path / name).is_file(), name
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["args"]["threads"] == 1 and data["args"]["seed"] == 0
    assert set(data["results"]) == set(METHODS)
    assert all(math.isfinite(before["ap_f"]) and math.isfinite(before["ap_r"]) for before in data["before"])
    for method, rows in data["results"].items():
        assert [row["task"] for row in rows] == [0], method
        for row in rows:
            keys = NUMBERS + (GSLORA_NUMBERS if method.startswith("gslora") else ())
            for key in keys:
                assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (method, row["task"], key)
            assert 0 <= row["ap_f"] <= 100 and 0 <= row["ap_r"] <= 100
            if method.startswith("gslora"):
                assert row["merge_diff"] <= 0.1, (method, row)  # merged adapters: same test mAP
    markdown = (tmp_path / "results.md").read_text()
    assert "1 torch thread(s)" in markdown and "seed 0" in markdown
    for method in METHODS:
        assert f"## {method}" in markdown
    # --merge: one report from runs of the same settings (here the run with itself), no training
    merged = tmp_path / "merged"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--merge", str(tmp_path), str(tmp_path), "--out", str(merged)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (merged / "results.md").read_text()
    assert all(f"## {method}" in report for method in METHODS) and "Merged with `--merge` from 2 runs" in report
    assert json.loads((merged / "results.json").read_text())["results"] == data["results"]
