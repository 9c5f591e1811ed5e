"""The ``lightning-plugins`` CLI: subcommands, configs that run, round-tripping configs, one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_plugins.cli import LightningPluginsCLI, main

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "examples" / "configs"
CLI = Path(sys.executable).with_name("lightning-plugins")
SHORT_RUN = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_checkpointing=false",
]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("LIGHTNING_PLUGINS_DEBUG", None)
    return subprocess.run([str(CLI), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_every_classification_config_parses_and_builds():
    configs = sorted(c for c in CONFIGS.glob("*.yaml") if not c.name.startswith("align_"))
    assert len(configs) >= 4, "examples/configs/ lost its classification recipes"
    for config in configs:
        cli = LightningPluginsCLI(args=["--config", str(config), "--trainer.logger=false"], run=False)
        assert cli.model.num_classes == cli.datamodule.num_classes


def test_every_alignment_stage_config_parses(capsys, tmp_path, monkeypatch):
    """The stage configs load the previous stage's outputs, so only the first builds here (on the data that
    `arithmetic-data` writes); all four parse. The slow pipeline test (tests/examples/test_align_pipeline.py) runs
    them for real."""
    monkeypatch.chdir(tmp_path)
    main(["arithmetic-data", "--output_dir", "outputs/align/data"])
    cli = LightningPluginsCLI(args=["--config", str(CONFIGS / "align_sft.yaml"), "--trainer.logger=false"], run=False)
    assert type(cli.model).__name__ == "SFTModule" and type(cli.datamodule).__name__ == "SFTDataModule"
    capsys.readouterr()
    for stage, command in (("sft", "fit"), ("rm", "fit"), ("dpo", "fit"), ("rs", "rejection-sample")):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--config", str(CONFIGS / f"align_{stage}.yaml"), "--print_config"])
        assert exit_info.value.code == 0, stage
        printed = yaml.safe_load(capsys.readouterr().out)
        assert "outputs/align/" in str(printed), stage


def test_help_lists_the_lightning_subcommands():
    for command in ([str(CLI), "--help"], [sys.executable, "-m", "lightning_plugins", "--help"]):
        out = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        for subcommand in ("fit", "validate", "test", "predict"):
            assert subcommand in out.stdout


def test_fit_help_documents_model_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", "ImageClassifier"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--model.patch_size" in out and "ViT patch side; must divide" in out


def test_console_script_fits_the_mnist_recipe(tmp_path):
    out = run_cli(
        "fit", "--config", str(CONFIGS / "vit_mnist5k.yaml"), *SHORT_RUN,
        f"--trainer.default_root_dir={tmp_path}", cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "val/acc" in metrics and "train/acc" in metrics


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "vit_digits.yaml"), "--model.init_args.lr=0.0005", "--print_config"])
    first = capsys.readouterr().out
    assert yaml.safe_load(first)["model"]["init_args"]["lr"] == 0.0005
    saved = tmp_path / "printed.yaml"
    saved.write_text(first)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(saved), "--print_config"])
    assert capsys.readouterr().out == first


def test_users_own_module_by_import_path(tmp_path):
    cli = LightningPluginsCLI(
        args=[
            "fit", "--config", str(CONFIGS / "vit_digits.yaml"), "--trainer.logger=false",
            "--model=user_models.TinyUserModel", "--model.hidden=8", *SHORT_RUN,
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    assert type(cli.model).__name__ == "TinyUserModel" and cli.model.hparams.hidden == 8
    assert cli.trainer.state.finished


def fail_with(override: str, capsys) -> str:
    """Run the CLI in-process with one bad override; it must exit with code 2 (not raise) and explain."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "vit_digits.yaml"), override])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("--model.init_args.backbone=vitt", "error: ValueError: unknown backbone 'vitt'; choose one of ['vit']"),
        ("--model.init_args.num_classes=-1", "error: ValueError: num_classes must be an integer >= 2, got -1"),
        ("--model.init_args.num_classes=3", "model.num_classes=3 but the data has 10 classes"),
        ("--data.init_args.val_fraction=2", "val_fraction must be in [0, 1), got 2"),
    ],
)
def test_bad_values_give_one_clear_line(capsys, override, message):
    error_lines = [line for line in fail_with(override, capsys).splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("--model.class_path=NoSuchModel", "NoSuchModel"),
        ("--model.init_args.depth=abc", "Expected a <class 'int'>. Got value: abc"),
        ("--trainer.no_such_option=3", "no_such_option"),
    ],
)
def test_parser_errors_name_the_bad_value(capsys, override, message):
    assert message in fail_with(override, capsys)


def test_console_script_reports_errors_without_traceback(tmp_path):
    out = run_cli("fit", "--config", str(CONFIGS / "vit_digits.yaml"), "--model.init_args.num_classes=-1", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "lightning-plugins: error: ValueError: num_classes must be an integer >= 2, got -1"
    )
