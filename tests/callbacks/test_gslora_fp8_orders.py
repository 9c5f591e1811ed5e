"""GSLoRA and FP8 in every order.

* FP8, then forget: a model whose Linear layers are already ``FP8Linear`` (converted by ``convert_to_fp8``, or kept
  by an FP8 fit with ``restore_layers=False``) is forgotten from with a plain ``32-true`` Trainer and with FP8 Trainers;
* forget, then FP8: after a forgetting sequence the model trains with ``precision="fp8-msamp"``;
* the CLI: ``lightning-plugins forget --trainer.precision=fp8-msamp --pretrain_epochs 1`` (it ended in a traceback
  when the FP8 pretraining left FP8 layers; now the pretraining restores plain layers or GSLoRA adapts the FP8
  ones, and the forgetting tasks run under FP8);
* forgetting *under* FP8 from a plain model is ``test_gslora_fp8.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch import nn

import lightning_plugins  # noqa: F401  (registers precision="fp8-msamp")
from lightning_plugins.callbacks import ForgettingDataModule, GSLoRA
from lightning_plugins.callbacks.gslora.lora import LoRALinear, find_lora, find_target_layers
from lightning_plugins.fp8 import FP8Linear, convert_to_fp8

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "examples" / "configs" / "gslora_mnist5k.yaml"
FFN = [f"backbone.blocks.{i}.mlp.fc{j}" for i in range(2) for j in (1, 2)]


def to_fp8(model: nn.Module, o2: bool) -> None:
    """What an FP8 fit leaves behind: FP8Linear layers; at O2 with FP8 weight gradients and FP16 master weights."""
    convert_to_fp8(model, wgrad_mode="fp8" if o2 else "dequantized", log_table=False)
    if o2:
        for layer in model.modules():
            if isinstance(layer, FP8Linear):
                layer.weight.data = layer.weight.data.to(torch.float16)


def trainer_options(precision: str) -> dict:
    if precision in ("O1", "O2"):
        from lightning_plugins import MSAMPPrecision

        return {"plugins": [MSAMPPrecision(level=precision)]}
    return {"precision": precision}


# ------------------------------------------------------------------------------------------- LoRA on FP8Linear
def test_lora_on_an_fp8_layer_with_fp16_master_weight_forwards_and_merges_exactly():
    torch.manual_seed(0)
    base = FP8Linear(32, 16, backend="emulated")
    base.weight.data = base.weight.data.to(torch.float16)
    adapter = LoRALinear(base, rank=4)
    assert adapter.lora_A.dtype == adapter.lora_B.dtype == torch.float32  # adapters stay fp32 over an fp16 weight
    with torch.no_grad():
        adapter.lora_B.normal_(0.0, 0.05)
    x = torch.randn(5, 32)
    expected = base(x) + adapter.scaling * (x @ adapter.lora_A.t() @ adapter.lora_B.t())
    torch.testing.assert_close(adapter(x), expected)

    weight = base.weight
    exact = (weight.detach().float() + adapter.delta_weight().detach()).to(torch.float16)
    adapter.merge_()
    assert base.weight is weight and weight.dtype == torch.float16
    assert torch.equal(weight, exact)  # W + dW rounded once to fp16, not W + fp16(dW)
    assert not bool(adapter.lora_B.any())  # a fresh adapter


def test_a_pattern_matching_no_linear_layer_gives_advice_that_works_on_fp8_models():
    from lightning_plugins.modules import ImageClassifier

    model = ImageClassifier(depth=2, embed_dim=32, patch_size=7, image_size=28, num_heads=2)
    convert_to_fp8(model, log_table=False)
    with pytest.raises(ValueError, match=r"a \w+; GS-LoRA adapts nn.Linear layers only \(and FP8Linear") as err:
        find_target_layers(model, r"(?P<block>.*blocks\.\d+)\.mlp")
    message = str(err.value)
    assert "'backbone.blocks.0.mlp.fc1'" in message
    suggested = re.search(r"target=r'(.+)'$", message).group(1)
    layers = find_target_layers(model, suggested)  # the advice is true: the suggested pattern finds the FFN layers
    assert [layer.name for layer in layers] == FFN and layers[0].block == "backbone.blocks.0"


# ---------------------------------------------------------------------------------------------- FP8, then forget
@pytest.mark.parametrize("o2, precision", [(False, "32-true"), (True, "32-true"), (False, "O1"), (True, "O2")],
                         ids=["fp8-O1-model/32-true", "fp8-O2-model/32-true", "fp8-O1-model/O1", "fp8-O2-model/O2"])
def test_forget_a_model_already_converted_to_fp8(pretrained_vit, mnist, quiet, o2, precision):
    model = pretrained_vit()
    to_fp8(model, o2)
    layers = {name: model.get_submodule(name) for name in FFN}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = ForgettingDataModule(mnist, replay_ratio=0.1, batch_size=32, eval_batch_size=500)
    callback = GSLoRA([[0, 1], [2, 3]], beta=0.1, bound=15.0, plots=False)
    for task in range(2):  # the second task finds the FP8 layers wrapped by the first
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=8, callbacks=[callback],
                             **quiet(**trainer_options(precision)))
        trainer.fit(model, data)
        assert callback.task_index == task + 1

    # the same FP8 layers are back in place (adapters merged into them and removed), in their own dtype
    assert not find_lora(model)
    assert all(model.get_submodule(name) is layer for name, layer in layers.items())
    assert all(layer.weight.dtype == (torch.float16 if o2 else torch.float32) for layer in layers.values())
    state = model.state_dict()
    assert set(state) == set(before)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert sorted(k for k in state if not torch.equal(state[k], before[k])) == sorted(f"{n}.weight" for n in FFN)
    assert all(p.requires_grad for p in model.parameters())
    assert all(row["acc_f"] is not None and row["epochs"] == 1 for row in callback.task_results())


def test_an_fp8_o2_model_is_forgotten_under_o2_to_zero(pretrained_vit, mnist, quiet):
    model = pretrained_vit()
    to_fp8(model, o2=True)
    data = ForgettingDataModule(mnist, replay_ratio=0.1, batch_size=32, eval_batch_size=500)
    callback = GSLoRA([[0, 1]], beta=0.1, bound=15.0, plots=False, early_stop=True)
    trainer = pl.Trainer(max_epochs=30, callbacks=[callback], **quiet(**trainer_options("O2")))
    trainer.fit(model, data)
    assert type(trainer.optimizers[0]).__name__ == "FP8AdamW"
    (row,) = callback.task_results()
    print("\nFP8 O2 model under O2:", {k: row[k] for k in ("epochs", "acc_f_before", "acc_f", "acc_r_before",
                                                             "acc_r")})
    assert row["acc_f_before"] > 70 and row["acc_f"] <= 1.0 and row["stopped_by"] == "early_stop"
    assert row["acc_r"] >= row["acc_r_before"] - 10.0
    assert all(isinstance(model.get_submodule(n), FP8Linear) for n in FFN)


def test_forget_after_an_fp8_fit_that_keeps_its_fp8_layers(pretrained_vit, mnist, quiet):
    from lightning_plugins import MSAMPPrecision

    model = pretrained_vit()
    plugin = MSAMPPrecision(level="O2", restore_layers=False)  # the FP8 layers (FP16 masters) outlive the fit
    pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, plugins=[plugin], **quiet()).fit(model, mnist)
    assert all(isinstance(model.get_submodule(n), FP8Linear) for n in FFN)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in FFN}
    data = ForgettingDataModule(mnist, replay_ratio=0.1, batch_size=32, eval_batch_size=500)
    callback = GSLoRA([[0, 1]], beta=0.1, bound=15.0, plots=False)
    pl.Trainer(max_epochs=1, limit_train_batches=8, callbacks=[callback], **quiet()).fit(model, data)
    assert callback.finished and not find_lora(model)
    for name in FFN:
        layer = model.get_submodule(name)
        assert isinstance(layer, FP8Linear) and layer.weight.dtype == torch.float16
        assert not torch.equal(layer.weight, before[name])


# ---------------------------------------------------------------------------------------------- forget, then FP8
def test_forget_then_train_in_fp8(pretrained_vit, mnist, quiet):
    model = pretrained_vit()
    data = ForgettingDataModule(mnist, replay_ratio=0.1, batch_size=32, eval_batch_size=500)
    callback = GSLoRA([[0, 1]], beta=0.1, bound=15.0, plots=False)
    pl.Trainer(max_epochs=1, limit_train_batches=5, callbacks=[callback], **quiet()).fit(model, data)
    assert callback.finished and not find_lora(model)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in FFN)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(p.requires_grad for p in model.parameters())
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=1, precision="fp8-msamp", **quiet())
    trainer.fit(model, mnist)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach().float(), before[n].float())]
    assert not unchanged, f"parameters not trained by the FP8 fit after forgetting: {unchanged}"
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------- the CLI
def tiny_forget_config(tmp_path: Path) -> Path:
    """The recipe with a tiny ViT, one task, two training batches per epoch and no logger, under ``tmp_path``."""
    config = yaml.safe_load(RECIPE.read_text())
    config["model"]["init_args"].update(embed_dim=32, depth=2, num_heads=2)
    config["trainer"].update(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             default_root_dir=str(tmp_path))
    config["trainer"]["callbacks"][0]["init_args"]["tasks"] = [[0, 1]]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_forget_with_fp8_pretraining(tmp_path, capsys):
    from lightning_plugins.cli import forget_from_config

    rows = forget_from_config(tiny_forget_config(tmp_path), ["--pretrain_epochs=1", "--trainer.precision=fp8-msamp"])
    assert [row["task"] for row in rows] == [0] and rows[0]["acc_f"] is not None
    assert "acc_f_before" in capsys.readouterr().out
    assert (tmp_path / "pretrained.pt").is_file() and (tmp_path / "gslora" / "table.txt").is_file()
