"""The project subcommands of ``lightning-plugins`` (``arithmetic-data``, ``rejection-sample``, ``build-pairs``) and
the alignment stage configs run through the CLI, FP8 included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_plugins.cli import LightningPluginsCLI, main
from lightning_plugins.modules.align import read_jsonl

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def run_main(*args: str) -> None:
    main(list(args))


def fail_with(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_help_names_the_project_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "Project subcommands" in out and all(name in out for name in ("arithmetic-data", "rejection-sample",
                                                                         "build-pairs"))
    with pytest.raises(SystemExit):
        main(["rejection-sample", "--help"])
    out = capsys.readouterr().out
    assert "--reward_model" in out and "--curve_ks" in out


def test_arithmetic_data_then_build_pairs(tmp_path, capsys):
    run_main("arithmetic-data", f"--output_dir={tmp_path}")
    written = json.loads(capsys.readouterr().out)
    assert sorted(written) == ["prompts", "rm_train", "rm_val", "sft_train", "sft_val"]
    assert len(read_jsonl(written["rm_train"], "preference")) == 400

    rs = tmp_path / "rs.jsonl"
    rs.write_text(json.dumps({"prompt": "1+1=", "responses": ["2", "3", ""], "scores": [1.0, -1.0, 0.0]}) + "\n")
    run_main("build-pairs", f"--input_path={rs}", f"--output_path={tmp_path / 'pairs.jsonl'}")
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 1 and summary["dropped_empty"] == 1
    assert read_jsonl(tmp_path / "pairs.jsonl", "preference") == [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}]


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    line = fail_with(capsys, "rejection-sample", f"--policy={tmp_path / 'sft.ckpt'}", "--reward_model=rm.ckpt",
                     "--prompts_path=p.jsonl", "--output_path=o.jsonl")
    assert f"FileNotFoundError: `policy` file not found: {tmp_path / 'sft.ckpt'}" in line


def test_unknown_strategy_and_unknown_option_are_one_line(tmp_path, capsys):
    rs = tmp_path / "rs.jsonl"
    rs.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"], "scores": [1.0, 0.0]}) + "\n")
    line = fail_with(capsys, "build-pairs", f"--input_path={rs}", "--output_path=o.jsonl", "--strategy=best")
    assert "Unknown pair strategy 'best'" in line
    line = fail_with(capsys, "build-pairs", f"--input_path={rs}", "--output_path=o.jsonl", "--stratgy=x")
    assert "stratgy" in line


@pytest.mark.parametrize("precision", ["32-true", "fp8-msamp"])
def test_sft_stage_config_runs_through_the_cli(tmp_path, capsys, precision):
    run_main("arithmetic-data", f"--output_dir={tmp_path / 'data'}")
    capsys.readouterr()
    cli = LightningPluginsCLI(args=[
        "fit", "--config", str(CONFIGS / "align_sft.yaml"), *QUIET, "--trainer.max_epochs=2",
        f"--trainer.precision={precision}", f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false",
        f"--data.train_path={tmp_path / 'data' / 'sft_train.jsonl'}",
        f"--data.val_path={tmp_path / 'data' / 'sft_val.jsonl'}",
        f"--model.export_dir={tmp_path / 'hf'}",
    ])
    assert type(cli.model).__name__ == "SFTModule" and cli.trainer.global_step == 20
    if precision == "fp8-msamp":
        converted = cli.trainer.precision_plugin.conversion_report.converted
        assert len(converted) == 2 * 7  # q, k, v, o, gate, up, down of both blocks; lm_head (vocab 100) stays
        # after the run the model holds plain layers again (portable; a later run in any precision trains them)
        assert not [n for n, m in cli.model.named_modules() if type(m).__name__ == "FP8Linear"]
    assert (tmp_path / "hf" / "model.safetensors").is_file()
