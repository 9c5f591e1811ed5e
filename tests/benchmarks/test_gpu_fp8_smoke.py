"""benchmarks/gpu_fp8.py runs end to end in --smoke mode (tiny sizes, CPU) and refuses clearly without a GPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_fp8.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_smoke_mode_runs_and_writes_results(tmp_path: Path) -> None:
    proc = _run("--smoke", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_fp8_smoke.json").read_text())
    assert (tmp_path / "gpu_fp8_smoke.md").is_file()
    assert [r["size"] for r in data["gemm"]] == [32, 64]
    for row in data["gemm"]:
        assert row["bf16_s"] > 0 and row["fp8_s"] > 0
        assert row["fp8_rel_err"] < 0.1  # E4M3 inputs: a few percent
    eager = [r for r in data["train"] if not r["compile"]]
    assert [r["mode"] for r in eager] == ["bf16-mixed", "fp8-msamp O1", "fp8-msamp O2"]
    for r in eager:
        assert r["status"] == "ok", r.get("traceback", r["status"])
        assert math.isfinite(r["loss_last"]) and r["median_step_s"] > 0
    assert "| precision | torch.compile |" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no FP8 GPU exists")
def test_without_gpu_exits_with_a_clear_message(tmp_path: Path) -> None:
    proc = _run("--out-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "cannot run the GPU benchmark" in proc.stderr and "--smoke" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fp8-msamp O1", "fp8-msamp O2"])
def test_compiled_training_step_has_no_graph_break(mode, one_torch_thread):
    # The GPU benchmark's torch.compile configurations, at smoke size on the CPU: the FP8 layers (O2's FP8 weight
    # gradients and FP8 optimizer included) must trace into each block's graph, or the compiled FP8 step would run
    # its GEMMs and scaling eagerly between graph pieces.
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_fp8
    from _gpt import GPTConfig  # (not its quiet_lightning: that would silence logs the later tests check)

    cfg = GPTConfig(vocab_size=256, seq_len=32, d_model=64, n_layers=2, n_heads=2)
    result = gpu_fp8.bench_train(mode, True, cfg, 2, torch.device("cpu"), warmup=1, steps=2, backend="emulated")
    assert result["status"] == "ok" and math.isfinite(result["loss_last"])
    assert result["graph_breaks"] == 0
    assert result["compiled_graphs"] >= 1
