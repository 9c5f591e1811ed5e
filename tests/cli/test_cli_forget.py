"""``lightning-plugins forget``: a whole GS-LoRA sequence from one YAML; GSLoRA in ``trainer.callbacks`` with ``fit``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_plugins.callbacks import GSLoRA
from lightning_plugins.cli import LightningPluginsCLI, forget_from_config, main

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "examples" / "configs" / "gslora_mnist5k.yaml"
CLI = Path(sys.executable).with_name("lightning-plugins")
TINY_MODEL = {"embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def tiny_config(tmp_path: Path, tasks=((0, 1), (2, 3), (4, 5))) -> Path:
    """The recipe with a tiny ViT, one short epoch per task, no logger, writing under ``tmp_path``."""
    config = yaml.safe_load(RECIPE.read_text())
    config["model"]["init_args"].update(TINY_MODEL)
    config["trainer"].update(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             default_root_dir=str(tmp_path))
    config["trainer"]["callbacks"][0]["init_args"]["tasks"] = [list(t) for t in tasks]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_recipe_is_three_tasks_of_two_classes_with_ten_percent_replay():
    cli = LightningPluginsCLI(args=["--config", str(RECIPE), "--trainer.logger=false"], run=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, GSLoRA)]
    assert callback.tasks == ((0, 1), (2, 3), (4, 5))
    assert cli.datamodule.replay_ratio == 0.1
    assert type(cli.datamodule.datamodule).__name__ == "MNIST5kDataModule"


def test_forget_pretrains_then_forgets_every_task_and_writes_the_report(tmp_path, capsys):
    rows = forget_from_config(tiny_config(tmp_path), ["--pretrain_epochs=1"])
    assert [row["task"] for row in rows] == [0, 1, 2]
    out = capsys.readouterr().out
    assert "acc_f_before" in out and "report:" in out
    report = tmp_path / "gslora"
    assert (report / "table.txt").read_text().splitlines()[0].split()[:3] == ["task", "forgotten", "acc_f_before"]
    assert len(json.loads((report / "history.json").read_text())) >= 3
    for name in ("history.csv", "accuracy_per_task.png"):
        assert (report / name).stat().st_size > 0

    # the weights it pretrained are saved and load back through --pretrained (a fresh run of the sequence)
    saved = tmp_path / "pretrained.pt"
    assert saved.is_file()
    rows = forget_from_config(tiny_config(tmp_path, tasks=[[7]]), [f"--pretrained={saved}"])
    assert [row["forgotten"] for row in rows] == [[7]]


def test_console_script_forgets_from_a_lightning_checkpoint(tmp_path):
    cli = LightningPluginsCLI(args=["--config", str(tiny_config(tmp_path))], run=False)
    checkpoint = tmp_path / "model.ckpt"
    cli.trainer.strategy.connect(cli.model)
    cli.trainer.save_checkpoint(checkpoint)  # a full Lightning checkpoint: loops, optimizer states, hparams
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [str(CLI), "forget", "--config", str(tiny_config(tmp_path, tasks=[[0, 1]])), f"--pretrained={checkpoint}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "acc_r_before" in out.stdout and (tmp_path / "gslora" / "history.csv").is_file()


def test_plain_fit_with_gslora_in_trainer_callbacks_runs_one_task(tmp_path):
    cli = LightningPluginsCLI(args=["fit", "--config", str(tiny_config(tmp_path))])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, GSLoRA)]
    assert callback.task_index == 1 and len(callback.task_results()) == 1
    assert (tmp_path / "gslora" / "history.csv").is_file()


def test_forget_resumes_from_a_mid_sequence_checkpoint_exactly(tmp_path):
    """``forget --ckpt_path`` (a checkpoint of task 1, epoch 0) ends with the weights of the uninterrupted run."""
    pretrained = tmp_path / "pretrained.pt"
    torch.manual_seed(0)
    cli = LightningPluginsCLI(args=["--config", str(tiny_config(tmp_path))], run=False)
    torch.save(cli.model.state_dict(), pretrained)

    def run(name: str, *overrides: str) -> tuple[list[dict], Path]:
        root = tmp_path / name
        root.mkdir()
        config = yaml.safe_load(tiny_config(root, tasks=[[0, 1], [2, 3]]).read_text())
        config["trainer"].update(max_epochs=2, enable_checkpointing=True)
        config["trainer"]["callbacks"].append({
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(root / "ckpts"), "filename": "{epoch}-{step}", "save_top_k": -1,
                          "every_n_epochs": 1, "save_on_train_epoch_end": True},
        })
        path = root / "resume.yaml"
        path.write_text(yaml.safe_dump(config))
        torch.manual_seed(0)
        return forget_from_config(path, list(overrides)), root / "ckpts"

    full_rows, full_ckpts = run("full", f"--pretrained={pretrained}")
    # one Trainer per task, global steps restart: task 1's files get Lightning's "-v1" suffix
    assert sorted(p.name for p in full_ckpts.iterdir()) == [
        "epoch=0-step=2-v1.ckpt", "epoch=0-step=2.ckpt", "epoch=1-step=4-v1.ckpt", "epoch=1-step=4.ckpt"]
    resumed_rows, resumed_ckpts = run("resumed", f"--ckpt_path={full_ckpts / 'epoch=0-step=2-v1.ckpt'}")
    assert [row["task"] for row in resumed_rows] == [0, 1]
    assert sorted(p.name for p in resumed_ckpts.iterdir()) == ["epoch=1-step=4.ckpt"]  # task 1's last epoch
    final = {name: torch.load(path, map_location="cpu", weights_only=True)["state_dict"] for name, path in
             (("full", full_ckpts / "epoch=1-step=4-v1.ckpt"), ("resumed", resumed_ckpts / "epoch=1-step=4.ckpt"))}
    assert final["full"].keys() == final["resumed"].keys()
    for key, value in final["full"].items():
        assert torch.equal(value, final["resumed"][key]), key
    keys = ("acc_f", "acc_r", "acc_o")
    assert [{k: r[k] for k in keys} for r in full_rows] == [{k: r[k] for k in keys} for r in resumed_rows]


def fail_with(capsys, config: Path, *overrides: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["forget", "--config", str(config), *overrides])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_missing_checkpoint_is_one_clear_line(tmp_path, capsys):
    line = fail_with(capsys, tiny_config(tmp_path), f"--pretrained={tmp_path / 'nope.ckpt'}")
    assert f"pretrained='{tmp_path / 'nope.ckpt'}' is not a file" in line


def test_no_trained_model_is_one_clear_line(tmp_path, capsys):
    line = fail_with(capsys, tiny_config(tmp_path))
    assert "forgetting needs a trained model: give --pretrained=" in line and "--pretrain_epochs=N" in line


def test_tasks_out_of_range_is_one_clear_line(tmp_path, capsys):
    line = fail_with(capsys, tiny_config(tmp_path, tasks=[[0, 12]]), "--pretrain_epochs=1")
    assert "task 0 holds class id(s) [12], out of range for 10 classes (model.num_classes)" in line


def test_checkpoint_of_another_model_is_one_clear_line(tmp_path, capsys):
    checkpoint = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, checkpoint)
    line = fail_with(capsys, tiny_config(tmp_path), f"--pretrained={checkpoint}")
    assert f"pretrained='{checkpoint}' does not fit ImageClassifier as configured" in line


def test_forget_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["forget", "--config", str(RECIPE), "--pretrain_epochs=3", "--print_config"])
    first = capsys.readouterr().out
    printed = yaml.safe_load(first)
    assert printed["pretrain_epochs"] == 3 and printed["pretrained"] is None
    assert printed["trainer"]["callbacks"][0]["init_args"]["tasks"] == [[0, 1], [2, 3], [4, 5]]
    assert printed["data"]["init_args"]["datamodule"]["class_path"].endswith("MNIST5kDataModule")
    saved = tmp_path / "printed.yaml"
    saved.write_text(first)
    with pytest.raises(SystemExit):
        main(["forget", "--config", str(saved), "--print_config"])
    assert capsys.readouterr().out == first


def test_help_lists_forget(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "forget" in capsys.readouterr().out
