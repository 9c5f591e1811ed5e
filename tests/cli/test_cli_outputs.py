"""``--trainer.default_root_dir=DIR`` moves every output of a shipped config (metrics, checkpoints, config.yaml,
the GS-LoRA report, pretrained weights) under DIR: nothing is written in the current directory."""

import sys
from pathlib import Path

import pytest
import yaml

from lightning_plugins.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
SHORT_RUN = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
TINY_VIT = ["--model.init_args.embed_dim=16", "--model.init_args.depth=1"]


@pytest.fixture(autouse=True)
def _setup(one_torch_thread, quiet_lightning, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-plugins"])
    yield


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()}


def run_in(tmp_path: Path, monkeypatch, args: list[str]) -> Path:
    """Run ``main(args + --trainer.default_root_dir=<tmp>/out)`` from ``tmp_path``; assert that every file it wrote
    is under ``<tmp>/out`` and return that folder."""
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    before = files_under(tmp_path)
    main([*args, f"--trainer.default_root_dir={out}"])
    written = files_under(tmp_path) - before
    outside = sorted(str(path.relative_to(tmp_path)) for path in written if out not in path.parents)
    assert outside == [], f"written outside --trainer.default_root_dir: {outside}"
    return out


@pytest.mark.parametrize("config", ["vit_digits.yaml", "vit_mnist5k.yaml", "vit_mnist5k_fp8.yaml"])
def test_fit_writes_only_under_default_root_dir(tmp_path, monkeypatch, config):
    out = run_in(tmp_path, monkeypatch, ["fit", "--config", str(CONFIGS / config), *SHORT_RUN, *TINY_VIT])
    logs = out / "lightning_logs" / "version_0"
    assert "val/acc" in (logs / "metrics.csv").read_text()
    assert (logs / "config.yaml").is_file()
    assert len(list((logs / "checkpoints").glob("*.ckpt"))) == 1


def test_forget_writes_only_under_default_root_dir(tmp_path, monkeypatch):
    config = yaml.safe_load((CONFIGS / "gslora_mnist5k.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"]["tasks"] = [[0, 1]]
    path = tmp_path / "configs" / "gslora_one_task.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = run_in(tmp_path, monkeypatch, ["forget", "--config", str(path), "--pretrain_epochs=1", *SHORT_RUN, *TINY_VIT])
    assert (out / "pretrained.pt").is_file()
    assert (out / "gslora" / "table.txt").is_file() and (out / "gslora" / "history.csv").is_file()
    assert (out / "lightning_logs" / "version_0" / "config.yaml").is_file()


def test_align_stage_logs_follow_default_root_dir(tmp_path, monkeypatch):
    """An alignment stage: logs and config.yaml follow default_root_dir; the files the next stage reads are the
    config's explicit paths (overridden here, as its comment says)."""
    monkeypatch.chdir(tmp_path)
    main(["arithmetic-data", "--output_dir", "data"])
    out = run_in(tmp_path, monkeypatch, [
        "fit", "--config", str(CONFIGS / "align_sft.yaml"), *SHORT_RUN,
        "--data.init_args.train_path=data/sft_train.jsonl", "--data.init_args.val_path=data/sft_val.jsonl",
        f"--model.init_args.export_dir={tmp_path / 'out' / 'hf'}",
        f"--trainer.callbacks.init_args.dirpath={tmp_path / 'out'}",
    ])
    assert (out / "sft.ckpt").is_file() and (out / "hf" / "config.json").is_file()
    assert (out / "lightning_logs" / "version_0" / "metrics.csv").is_file()
