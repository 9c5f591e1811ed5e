"""A mistyped class name or a value of the wrong type, in a YAML config or on the command line, is one line on
stderr (exit code 2) that names the config key, the value and, for a class name, the closest known class; the
usage block and jsonargparse's full report only with ``LIGHTNING_PLUGINS_DEBUG=1``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_plugins.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
CLI = Path(sys.executable).with_name("lightning-plugins")


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """The CLI's own argv (LightningCLI warns when sys.argv, here pytest's, and args are both given)."""
    monkeypatch.setattr(sys, "argv", ["lightning-plugins"])
    monkeypatch.delenv("LIGHTNING_PLUGINS_DEBUG", raising=False)


def digits_config(tmp_path: Path, **model_changes) -> Path:
    """vit_digits.yaml with ``model`` entries replaced (``class_path``, or init_args given as ``init_args={...}``)."""
    config = yaml.safe_load((CONFIGS / "vit_digits.yaml").read_text())
    config["model"]["init_args"].update(model_changes.pop("init_args", {}))
    config["model"].update(model_changes)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def one_line_error(capsys, *args: str) -> str:
    """Run ``main`` on ``args``; it must exit with code 2 after writing exactly one line to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lightning-plugins: error: ")
    return lines[0]


def test_class_name_typo_in_yaml_is_one_line_with_a_suggestion(tmp_path, capsys):
    line = one_line_error(capsys, "fit", "--config", str(digits_config(tmp_path, class_path="ImageClassifer")))
    assert line == (
        "lightning-plugins: error: model.class_path: no class 'ImageClassifer'; did you mean 'ImageClassifier'?"
    )


def test_wrong_type_in_yaml_is_one_line_naming_key_and_value(tmp_path, capsys):
    line = one_line_error(capsys, "fit", "--config", str(digits_config(tmp_path, init_args={"embed_dim": "big"})))
    assert "model.init_args.embed_dim: " in line and "Got value: big" in line


def test_wrong_type_on_the_command_line_is_one_line_naming_key_and_value(capsys):
    digits = str(CONFIGS / "vit_digits.yaml")
    line = one_line_error(capsys, "fit", "--config", digits, "--model.init_args.embed_dim=big")
    assert "model.init_args.embed_dim: " in line and "Got value: big" in line


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--data.class_path=DigitDataModule",
         "data.class_path: no class 'DigitDataModule'; did you mean 'DigitsDataModule'?"),
        ("--model=ImageClassifer", "model.class_path: no class 'ImageClassifer'; did you mean 'ImageClassifier'?"),
        ("--model.class_path=lightning_plugins.modules.ImageClassifer",
         "did you mean 'lightning_plugins.modules.ImageClassifier'?"),
        ("--trainer.callbacks+=GSLora", "trainer.callbacks.class_path: no class 'GSLora'; did you mean 'GSLoRA'?"),
        ("--trainer.callbacks+=ModelCheckpoin", "did you mean 'ModelCheckpoint'?"),
        ("--model.init_args.embed_dimm=3",
         "model.init_args.embed_dimm: ImageClassifier has no argument 'embed_dimm'; did you mean 'embed_dim'?"),
        ("--model.class_path=torch.nn.Linear", "model.class_path: 'torch.nn.Linear' is not a LightningModule"),
        ("--trainer.max_epochs=x", "trainer.max_epochs: Expected a <class 'int'>. Got value: x"),
        ("--trainer.precision=fp8-msam", "trainer.precision: 'fp8-msam' is none of the accepted types"),
    ],
)
def test_other_parser_errors_are_one_line(capsys, override, expected):
    assert expected in one_line_error(capsys, "fit", "--config", str(CONFIGS / "vit_digits.yaml"), override)


def test_nested_class_name_typo_names_the_nested_key(capsys):
    line = one_line_error(capsys, "forget", "--config", str(CONFIGS / "gslora_mnist5k.yaml"),
                          "--data.init_args.datamodule.class_path=MNIST5KDataModule")
    assert line.endswith(
        "data.init_args.datamodule.class_path: no class 'MNIST5KDataModule'; did you mean 'MNIST5kDataModule'?"
    )


def test_debug_env_keeps_the_full_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LIGHTNING_PLUGINS_DEBUG", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(digits_config(tmp_path, class_path="ImageClassifer"))])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and "Does not validate against any of the Union subtypes" in err


def test_console_script_prints_one_line(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("LIGHTNING_PLUGINS_DEBUG", None)
    config = digits_config(tmp_path, class_path="ImageClassifer")
    done = subprocess.run([str(CLI), "fit", "--config", str(config)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "lightning-plugins: error: model.class_path: no class 'ImageClassifer'; did you mean 'ImageClassifier'?"
    ]


def test_project_subcommand_parse_error_names_key_and_value(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["rejection-sample", "--config", str(CONFIGS / "align_rs.yaml"), "--k=abc"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "lightning-plugins: error: k: Expected a <class 'int'>. Got value: abc"
    ]
