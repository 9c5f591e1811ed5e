"""``examples/align_pipeline.py``: SFT -> reward model -> rejection sampling -> DPO on the arithmetic task reaches the
issue's goals on the exact ground truth (the right sum), and is deterministic: the same seed and thread setting give
bitwise identical metrics, in fresh processes with different hash seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_plugins.modules.align import ArithmeticTask

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


def _run_both(outputs: list[Path], *args: str) -> list[dict]:
    """Run the pipeline once per output folder, concurrently, each in a fresh process (the numerics are pinned before
    torch computes anything) with its own ``PYTHONHASHSEED``; their reports."""
    runs = []
    for i, output in enumerate(outputs):
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONHASHSEED": str(i + 1)}
        log = open(output.with_suffix(".log"), "w")
        runs.append((subprocess.Popen([sys.executable, str(SCRIPT), "--output", str(output), *args], env=env,
                                      stdout=log, stderr=subprocess.STDOUT), log))
    for process, log in runs:
        process.wait(timeout=600)
        log.close()
        assert process.returncode == 0, Path(log.name).read_text()[-3000:]
    return [json.loads((output / "report.json").read_text()) for output in outputs]


def _metrics(report: dict) -> dict:
    """Every metric of a report: without the times and the output paths."""
    out = {k: v for k, v in report.items() if k != "seconds"}
    out["dpo_pairs"] = {k: v for k, v in out["dpo_pairs"].items() if k != "output"}
    return out


def test_same_seed_and_threads_give_bitwise_identical_metrics(tmp_path):
    """Two ``--quick`` runs (a few epochs per stage), seed 1, one thread, AVX2 code path: every metric equal to the
    last bit, although the two processes hash strings differently (no set/dict-order dependence). The seed reaches
    every stage: the task data and each fit's ``seed_everything`` and data-order seed."""
    args = ("--quick", "--seed", "1", "--threads", "1", "--isa", "avx2")
    first, second = _run_both([tmp_path / "a", tmp_path / "b"], *args)
    assert first["numerics"]["threads"] == 1 and first["numerics"]["deterministic_algorithms"]
    assert first["numerics"]["MKL_CBWR"] == "AVX2" and not first["numerics"]["aten_cpu_capability"].startswith("AVX512")
    assert first["seed"] == 1 and first["quick"]
    assert _metrics(first) == _metrics(second)
    rows_a = (tmp_path / "a" / "rs" / "rs.jsonl").read_text()
    assert rows_a == (tmp_path / "b" / "rs" / "rs.jsonl").read_text()  # same samples, same reward scores
    md = (tmp_path / "a" / "report.md").read_text()
    assert "Seed 1, 1 torch thread(s), CPU code path avx2" in md
    configs = sorted((tmp_path / "a").rglob("config.yaml"))  # LightningCLI's copy of each fit's final config
    assert len(configs) == 3, configs
    for path in configs:
        config = yaml.safe_load(path.read_text())
        assert config["seed_everything"] == 1 and config["data"]["init_args"]["seed"] == 1, path
    ArithmeticTask(seed=1).write(tmp_path / "expected")
    for name in ("sft_train.jsonl", "rm_train.jsonl"):
        assert (tmp_path / "a" / "data" / name).read_text() == (tmp_path / "expected" / name).read_text()


def test_pin_numerics_sets_threads_code_path_and_rejects_bad_values():
    """``pin_numerics`` in a fresh process: the thread count, deterministic algorithms, the AVX2 environment of MKL,
    ATen and oneDNN; ``threads < 1`` and an unknown code path are errors naming the value."""
    code = (
        "import json; import lightning_plugins.reproducible as a\n"
        "print(json.dumps(a.pin_numerics(1, 'avx2')))\n"
        "for bad in ((0, 'avx2'), (1, 'avx9')):\n"
        "    try:\n"
        "        a.pin_numerics(*bad)\n"
        "    except ValueError as err:\n"
        "        print('error:', err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    numerics = json.loads(lines[0])
    assert numerics["threads"] == 1 and numerics["deterministic_algorithms"] and numerics["isa"] == "avx2"
    assert (numerics["MKL_CBWR"], numerics["ATEN_CPU_CAPABILITY"], numerics["ONEDNN_MAX_CPU_ISA"]) == ("AVX2", "avx2",
                                                                                                        "AVX2")
    assert not numerics["aten_cpu_capability"].startswith("AVX512")  # AVX2 on x86-64 (an ARM CPU has its own)
    assert "threads must be >= 1, got 0" in lines[1] and "'avx9'" in lines[2]
