"""``examples/align_pipeline.py --output DIR`` writes every stage's files under DIR (none in the current directory)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from lightning_plugins.cli import LightningPluginsCLI
from lightning_plugins.commands import run_command

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "align_pipeline.py"
STAGES = ("align_sft.yaml", "align_rm.yaml", "align_rs.yaml", "align_dpo.yaml")


@pytest.fixture(scope="module")
def pipeline():
    spec = importlib.util.spec_from_file_location("align_pipeline_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings(value)]
    return [node] if isinstance(node, str) else []


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_config_points_under_output(pipeline, tmp_path, stage):
    out = tmp_path / "out"
    config = yaml.safe_load(pipeline.stage_config(stage, out).read_text())
    paths = [s for s in strings(config) if "/" in s and not s.startswith("lightning.")]
    assert paths, stage
    assert [p for p in paths if not p.startswith(str(out) + "/")] == [], stage
    if "trainer" in config:  # the fit stages: logs and config.yaml follow default_root_dir (no logger in the config)
        assert config["trainer"]["default_root_dir"].startswith(str(out) + "/")
        assert "logger" not in config["trainer"]


def test_sft_stage_writes_only_under_output(pipeline, tmp_path, monkeypatch, one_torch_thread):
    """The SFT stage as the pipeline runs it (its rewritten config), one short epoch, from an empty directory."""
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["align_pipeline.py"])
    run_command("arithmetic-data", [f"--output_dir={out / 'data'}"])
    LightningPluginsCLI(args=[
        "fit", "--config", str(pipeline.stage_config("align_sft.yaml", out)), "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ])
    assert [p for p in cwd.rglob("*")] == []
    assert (out / "sft" / "sft.ckpt").is_file() and (out / "sft" / "hf" / "config.json").is_file()
    assert (out / "sft" / "lightning_logs" / "version_0" / "metrics.csv").is_file()
