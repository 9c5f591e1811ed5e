"""End to end: a tiny ViT pretrained on MNIST-5k forgets a sequence of class sets; a plain user module; resume."""

import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_plugins.callbacks import ForgettingDataModule, GSLoRA, forget_sequence
from lightning_plugins.callbacks.gslora.lora import find_lora

TASKS = [[0, 1], [2, 3], [4, 5]]


def test_tiny_vit_forgets_three_tasks_one_fit_per_task(pretrained_vit, mnist, quiet, tmp_path):
    model = pretrained_vit()
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    data = ForgettingDataModule(mnist, replay_ratio=0.1, batch_size=32, eval_batch_size=500)
    # fixed epochs (early_stop=False): 20 per task, so 60 validations
    callback = GSLoRA(TASKS, beta=0.1, bound=15.0, early_stop=False, output_dir=str(tmp_path / "report"))
    for task in range(len(TASKS)):
        trainer = pl.Trainer(max_epochs=20, callbacks=[callback], **quiet())
        trainer.fit(model, data)
        assert callback.task_index == task + 1

    rows = callback.task_results()
    print("\n" + "\n".join(str({k: row[k] for k in ("task", "acc_f_before", "acc_f", "acc_r_before", "acc_r",
                                                    "acc_o", "seconds")}) for row in rows))
    reference_acc_r = rows[0]["acc_r_before"]
    for row in rows:
        assert row["acc_f_before"] > 70
        assert row["acc_f"] <= 5.0
        assert row["acc_o"] is None or row["acc_o"] <= 10.0
        assert row["acc_r"] >= reference_acc_r - 10.0
        assert row["h"] > 70
    # 2 blocks x (fc1 32->64 + fc2 64->32) x rank 8: 2 * (8*32 + 64*8 + 8*64 + 32*8) = 3072 LoRA parameters
    assert rows[0]["trainable_params"] == 3072
    assert rows[0]["trainable_ratio"] == pytest.approx(3072 / rows[0]["total_params"])
    assert set(k for k in rows[0] if k.startswith("group_norm/")) == {"group_norm/backbone.blocks.0",
                                                                    "group_norm/backbone.blocks.1"}
    kinds = [row["kind"] for row in callback.history]
    assert kinds.count("before") == 3 and kinds.count("val") == 60 and kinds.count("task") == 3

    # after the last task the adapters are gone: same layout as before, only the FFN weights changed
    assert not find_lora(model)
    state = model.state_dict()
    assert set(state) == set(pretrained)
    changed = sorted(k for k in state if not torch.equal(state[k], pretrained[k]))
    assert changed == [f"backbone.blocks.{i}.mlp.fc{j}.weight" for i in range(2) for j in (1, 2)]
    assert all(p.requires_grad for p in model.parameters())

    for name in ("history.csv", "history.json", "accuracy_per_task.png", "group_norms.png",
                 "validation_curves.png"):
        assert os.path.getsize(tmp_path / "report" / name) > 0

    # the test split through the same callback: evaluated in the view of the last task
    pl.Trainer(callbacks=[callback], **quiet()).test(model, data, verbose=False)
    test_row = callback.history[-1]
    assert test_row["kind"] == "test" and test_row["task"] == 2
    assert test_row["acc_f"] <= 10.0 and test_row["acc_o"] <= 10.0 and test_row["acc_r"] > 60
    pl.Trainer(callbacks=[callback], **quiet()).validate(model, data, verbose=False)
    assert callback.history[-1]["kind"] == "validate"
    assert callback.history[-1]["acc_f"] == rows[-1]["acc_f"] and callback.history[-1]["acc_r"] == rows[-1]["acc_r"]


class DigitNet(pl.LightningModule):
    """A user's module, not ours: torchvision's ViT, no num_classes attribute, no embed, its own optimizer."""

    def __init__(self):
        super().__init__()
        from torchvision.models.vision_transformer import VisionTransformer

        self.vit = VisionTransformer(image_size=28, patch_size=7, num_layers=2, num_heads=2, hidden_dim=32,
                                     mlp_dim=64, num_classes=10)

    def forward(self, x):
        return self.vit(x.expand(-1, 3, -1, -1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def test_plain_user_module_is_forgotten_from(mnist, quiet):
    pytest.importorskip("torchvision")
    pl.seed_everything(1, verbose=False)
    model = DigitNet()
    pl.Trainer(max_epochs=10, **quiet()).fit(model, train_dataloaders=mnist.train_dataloader())
    # plain (x, y) batches of a 20% random slice of the training data: the callback splits them by label
    subset = Subset(mnist.train_set, torch.randperm(len(mnist.train_set))[: len(mnist.train_set) // 5].tolist())
    train = DataLoader(subset, batch_size=32, shuffle=True)
    callback = GSLoRA([[3]], beta=0.1, bound=15.0, lr=None, plots=False)  # lr=None: the module's own AdamW
    trainer = pl.Trainer(max_epochs=15, callbacks=[callback], **quiet())
    trainer.fit(model, train_dataloaders=train, val_dataloaders=mnist.val_dataloader())
    row = callback.task_results()[0]
    print("\nplain module:", {k: row[k] for k in ("acc_f_before", "acc_f", "acc_r_before", "acc_r")})
    assert row["acc_f_before"] > 50 and row["acc_f"] <= 5.0
    assert row["acc_r"] >= row["acc_r_before"] - 10.0
    assert "val_acc" in trainer.callback_metrics  # the module's own validation_step still ran
    assert not find_lora(model) and "training_step" not in model.__dict__


class KeepState(Callback):
    def __init__(self, gslora):
        self.gslora, self.states = gslora, []

    def on_train_epoch_end(self, trainer, pl_module):
        self.states.append(self.gslora.state_dict())


@pytest.mark.slow
def test_gslora_plus_plus_few_shot_with_missing_classes(pretrained_vit, mnist, quiet, tmp_path):
    model = pretrained_vit()
    data = ForgettingDataModule(mnist, shots=4, batch_size=4, missing_classes=[9], eval_batch_size=500)
    callback = GSLoRA([[0, 1], [2, 3]], prototypes=True, proto_forget_weight=[0.05, 0.05], proto_bound=18.0,
                      beta=0.1, bound=15.0, output_dir=str(tmp_path), eval_test=True)
    spy = KeepState(callback)
    rows = forget_sequence(model, data, callback, trainer=dict(max_epochs=30, callbacks=[spy], **quiet()))
    first_task = spy.states[0]["prototypes"]
    # prototypes of the classes with training data: forgotten 0, 1 and retained 2..8 (missing class 9 has none)
    assert first_task["task"] == 0 and first_task["classes"].tolist() == list(range(9))
    assert first_task["values"].shape == (9, 32)
    assert spy.states[-1]["prototypes"]["classes"].tolist() == [2, 3, 4, 5, 6, 7, 8]  # old 0, 1 get no data
    print("\nGS-LoRA++ 4-shot:", [{k: r[k] for k in ("acc_f", "acc_r", "acc_o", "acc_m")} for r in rows])
    for row in rows:
        assert row["acc_m"] is not None and row["n_missing"] > 0
        assert row["drop"] > 0
        assert row["test_acc_f"] is not None and row["test_acc_f_before"] > row["test_acc_f"]
    assert rows[0]["acc_f"] <= 20.0


class CountEpochs(Callback):
    def __init__(self):
        self.epochs = 0

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs += 1


@pytest.mark.parametrize("resume_at, epochs_left", [("task1/epoch=0.ckpt", 2), ("task0/epoch=2.ckpt", 3)])
def test_resume_mid_sequence_is_exact(pretrained_vit, mnist, quiet, tmp_path, resume_at, epochs_left):
    tasks = [[0, 1], [2, 3]]

    def run(root, ckpt_path=None):
        model = pretrained_vit()
        data = ForgettingDataModule(mnist, replay_ratio=0.05, batch_size=32, eval_batch_size=500)
        # fixed epochs (early_stop=False): the checkpoints and epoch counts below are those of 3 epochs per task
        callback = GSLoRA(tasks, beta=0.1, bound=15.0, prototypes=True, plots=False, early_stop=False)
        counter = CountEpochs()
        folders = iter(range(10))

        def make(task_index):
            # one checkpoint per epoch; a resumed run learns its task only when the checkpoint is loaded
            checkpoint = ModelCheckpoint(dirpath=str(root / f"fit{next(folders)}"), filename="{epoch}",
                                         save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
            return pl.Trainer(max_epochs=3, callbacks=[callback, checkpoint, counter],
                              **quiet(enable_checkpointing=True, default_root_dir=str(root)))

        forget_sequence(model, data, callback, trainer=make, ckpt_path=ckpt_path)
        return model, callback, counter.epochs

    full_model, full, full_epochs = run(tmp_path / "full")
    checkpoint = str(tmp_path / "full" / resume_at.replace("task", "fit"))
    resumed_model, resumed, resumed_epochs = run(tmp_path / "resumed", ckpt_path=checkpoint)
    assert (full_epochs, resumed_epochs) == (6, epochs_left)
    for key, value in full_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    drop = {"seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in full.history] == \
        [{k: v for k, v in r.items() if k not in drop} for r in resumed.history]
    assert resumed.finished and resumed.task_results()[1]["acc_f"] is not None
