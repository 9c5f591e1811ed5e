"""Every bad input to GSLoRA fails early with a message naming the value, what is allowed and the fix."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_plugins.callbacks import GSLoRA


class Mixer(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 2 * dim)
        self.mlp.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.mlp.fc2(torch.relu(self.mlp.fc1(x)))


class UserModule(pl.LightningModule):
    """A user's module that knows nothing about forgetting; ``output`` selects a (bad) forward output."""

    def __init__(self, classes=5, output="logits", optimizer="all"):
        super().__init__()
        self.blocks = nn.ModuleList(Mixer() for _ in range(2))
        self.out = nn.Linear(8, classes)
        self.output = output
        self.optimizer = optimizer

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        logits = self.out(x)
        if self.output == "tuple":
            return logits, x
        if self.output == "3d":
            return logits.unsqueeze(1)
        return logits

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        params = self.out.parameters() if self.optimizer == "head" else self.parameters()
        return torch.optim.SGD(params, lr=0.1)


def loader(classes=5):
    x = torch.randn(20, 8)
    y = torch.arange(20) % classes
    return DataLoader(TensorDataset(x, y), batch_size=10)


def fit(module, callback, quiet, classes=5):
    trainer = pl.Trainer(max_epochs=1, callbacks=[callback], **quiet())
    trainer.fit(module, train_dataloaders=loader(classes), val_dataloaders=loader(classes))
    return trainer


def test_no_layer_matches_lists_module_names(quiet):
    with pytest.raises(ValueError) as err:
        fit(UserModule(), GSLoRA([[0]], target=r".*encoder\.h\.\d+\.ffn"), quiet)
    message = str(err.value)
    assert "no Linear layer of UserModule fully matches" in message
    assert "'blocks.0.mlp.fc1'" in message and "'out'" in message and "Pass target=" in message


def test_default_target_needs_no_configuration_on_user_block_names(quiet):
    # the user module's layers are blocks.N.mlp.fc1/fc2, as in timm: the defaults find them
    callback = GSLoRA([[0]], lr=0.01)
    fit(UserModule(), callback, quiet)
    assert callback.finished and [row["task"] for row in callback.task_results()] == [0]


def test_class_id_out_of_range_from_module_attribute(quiet):
    module = UserModule()
    module.num_classes = 5
    with pytest.raises(ValueError, match=r"task 1 holds class id\(s\) \[5\], out of range for 5 classes "
                                         r"\(UserModule.num_classes\); class ids must be in \[0, 4\]"):
        fit(module, GSLoRA([[0], [1, 5]]), quiet)


def test_class_id_out_of_range_from_logits(quiet):
    with pytest.raises(ValueError, match=r"holds class id\(s\) \[7\], out of range for 5 classes \(UserModule.forward "
                                         r"returns 5 logits\)"):
        fit(UserModule(), GSLoRA([[7]]), quiet)


def test_class_id_out_of_range_from_argument():
    with pytest.raises(ValueError, match=r"\[12\], out of range for 10 classes \(num_classes argument\)"):
        GSLoRA([[12]], num_classes=10)


@pytest.mark.parametrize(
    "tasks, message",
    [
        ([[0, 1], [2, 1]], "class 1 is in task 0 and again in task 1: tasks overlap, and a class can be forgotten "
                           "only once"),
        ([[0], []], "task 1 is empty"),
        ([[2, 2]], r"lists class\(es\) \[2\] more than once"),
        ([], "tasks is empty"),
    ],
)
def test_bad_task_lists(tasks, message):
    with pytest.raises(ValueError, match=message):
        GSLoRA(tasks)


def test_output_that_is_not_logits(quiet):
    with pytest.raises(TypeError, match=r"UserModule.forward\(x\) to return class logits.*returned a tuple"):
        fit(UserModule(output="tuple"), GSLoRA([[0]]), quiet)
    with pytest.raises(ValueError, match=r"shape \[batch, num_classes\] = \[10, C\]; got a torch.float32 tensor of "
                                         r"shape \[10, 1, 5\]"):
        fit(UserModule(output="3d"), GSLoRA([[0]]), quiet)


def test_prototypes_need_embed(quiet):
    with pytest.raises(TypeError, match=r"GSLoRA\(prototypes=True\) needs UserModule.embed\(x\)"):
        fit(UserModule(), GSLoRA([[0]], prototypes=True), quiet)


def test_module_optimizer_without_lora_tensors(quiet):
    with pytest.raises(RuntimeError, match="does not hold the LoRA tensors"):
        fit(UserModule(optimizer="head"), GSLoRA([[0]], lr=None), quiet)


def test_fit_after_the_last_task(quiet):
    callback = GSLoRA([[0]])
    module = UserModule()
    fit(module, callback, quiet)
    with pytest.raises(RuntimeError, match="all 1 forgetting tasks of this GSLoRA callback are done"):
        fit(module, callback, quiet)


def test_resume_with_other_tasks():
    state = GSLoRA([[0], [1]]).state_dict()
    with pytest.raises(ValueError, match=r"state is for tasks \[\[0\], \[1\]\], but this callback has tasks \[\[0\]\]"):
        GSLoRA([[0]]).load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beta=[0.1, 0.2]), "beta gives 2 values for 1 tasks"),
        (dict(beta=-1.0), "beta must be a number >= 0"),
        (dict(grouping="head"), "grouping must be one of"),
        (dict(rank=0), "rank must be an integer >= 1"),
        (dict(bound=0), "bound must be > 0"),
        (dict(lr=0), "lr must be > 0"),
        (dict(proto_distance="cos"), "proto_distance must be one of"),
        (dict(target="fc("), "not a valid regex"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GSLoRA([[0]], **kwargs)


def test_batch_without_labels(quiet):
    x = torch.randn(20, 8)
    bad = DataLoader(TensorDataset(x), batch_size=10)
    trainer = pl.Trainer(max_epochs=1, callbacks=[GSLoRA([[0]])], **quiet())
    with pytest.raises(TypeError, match=r"batches \(x, y\) with integer class labels"):
        trainer.fit(UserModule(), train_dataloaders=bad)


class NormedModule(UserModule):
    """A user module with BatchNorm: its running statistics must stay frozen while forgetting."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(8)

    def forward(self, x):
        return super().forward(self.norm(x))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_frozen_batchnorm_and_precision(quiet, precision):
    module = NormedModule()
    stats = module.norm.running_mean.clone()
    head = module.out.weight.clone()
    callback = GSLoRA([[0], [1]], lr=0.05, early_stop=False)  # fixed epochs: 2 tasks x 2 validations
    for _ in range(2):
        trainer = pl.Trainer(max_epochs=2, callbacks=[callback], **quiet(precision=precision))
        trainer.fit(module, train_dataloaders=loader(), val_dataloaders=loader())
    assert callback.finished
    assert torch.equal(module.norm.running_mean, stats) and torch.equal(module.out.weight, head)
    assert [row["kind"] for row in callback.history].count("val") == 4  # validation ran through the wrapper
    assert all(row["acc_f"] is not None for row in callback.task_results())
