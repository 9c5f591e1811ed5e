"""Per-task data: forget / retain replay subsets (ratio, N-shot, missing classes), evaluation splits, seeding."""

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from lightning_plugins.callbacks import ForgettingDataModule
from lightning_plugins.callbacks.gslora.data import SeededRandomSampler, dataset_targets, select_task_samples
from lightning_plugins.callbacks.gslora.tasks import TaskView, validate_tasks

# 5 classes with 20, 20, 20, 20, 10 samples
LABELS = [c for c in range(4) for _ in range(20)] + [4] * 10


class Labelled(Dataset):
    def __init__(self, labels):
        self.targets = list(labels)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.full((1, 2, 2), float(i)), self.targets[i]


def test_ratio_subsets_are_per_class_and_seeded():
    task = TaskView(1, forgotten=frozenset({1}), old=frozenset({0}))
    samples = select_task_samples(LABELS, task, replay_ratio=0.1, forget_ratio=0.5, seed=3)
    forget_labels = [LABELS[i] for i in samples.forget]
    retain_labels = [LABELS[i] for i in samples.retain]
    assert forget_labels == [1] * 10
    assert sorted(retain_labels) == [2, 2, 3, 3, 4]  # round(0.1*20)=2, round(0.1*10)=1; old class 0 gets none
    assert samples == select_task_samples(LABELS, task, replay_ratio=0.1, forget_ratio=0.5, seed=3)
    assert samples != select_task_samples(LABELS, task, replay_ratio=0.1, forget_ratio=0.5, seed=4)


def test_shots_and_missing_classes():
    task = TaskView(0, forgotten=frozenset({0, 1}), old=frozenset(), missing=frozenset({3}))
    samples = select_task_samples(LABELS, task, shots=4, seed=0)
    assert sorted(LABELS[i] for i in samples.forget) == [0] * 4 + [1] * 4
    assert sorted(LABELS[i] for i in samples.retain) == [2] * 4 + [4] * 4


def test_task_sample_errors():
    with pytest.raises(ValueError, match=r"class\(es\) \[7\] of task 0 have no training samples"):
        select_task_samples(LABELS, TaskView(0, frozenset({7}), frozenset()))
    with pytest.raises(ValueError, match="leaves no retained class"):
        select_task_samples(LABELS, TaskView(1, frozenset({4}), frozenset({0, 1, 2, 3})))


def test_datamodule_from_datasets():
    train, val = Labelled(LABELS), Labelled(LABELS[::5])
    dm = ForgettingDataModule(train_set=train, val_set=val, replay_ratio=0.25, batch_size=4, missing_classes=[2])
    dm.setup("fit")
    assert dm.num_classes == 5
    dm.set_forgetting_task(0, [0], [])
    loaders = dm.train_dataloader()
    assert set(loaders) == {"retain", "forget"}
    assert sorted(dataset_targets(loaders["forget"].dataset)) == [0] * 5
    assert sorted(set(dataset_targets(loaders["retain"].dataset))) == [1, 3, 4]  # missing class 2 withheld
    splits = dm.eval_splits("val")
    assert {k: len(v) for k, v in splits.items()} == {"forgotten": 4, "retained": 10, "old": 0, "missing": 4}
    assert len(dm.val_dataloader().dataset) == len(val)
    assert len(dm.prototype_dataloader().dataset) == 5 + len(loaders["retain"].dataset)
    dm.set_forgetting_task(1, [1], [0])
    assert sorted(dataset_targets(dm.forget_dataset())) == [1] * 5
    assert set(dataset_targets(dm.retained_full_dataset())) == {3, 4}
    with pytest.raises(ValueError, match=r"class\(es\) \[2\] of task 2 are also missing_classes"):
        dm.set_forgetting_task(2, [2], [0, 1])


def test_datamodule_wraps_project_datamodule(mnist):
    dm = ForgettingDataModule(mnist, shots=4, batch_size=8)
    dm.setup("fit")
    assert dm.num_classes == 10 and dm.train_set is mnist.train_set
    dm.set_forgetting_task(0, [0, 1], [])
    batch = next(iter(dm.train_dataloader()["forget"]))
    assert batch[0].shape == (8, 1, 28, 28) and set(batch[1].tolist()) <= {0, 1}
    assert len(dm.retain_dataset()) == 8 * 4


def test_datamodule_argument_errors():
    data = Labelled(LABELS)
    with pytest.raises(ValueError, match="exactly one of datamodule"):
        ForgettingDataModule()
    with pytest.raises(ValueError, match="val_set is needed"):
        ForgettingDataModule(train_set=data)
    with pytest.raises(ValueError, match=r"replay_ratio must be in \(0, 1\], got 0"):
        ForgettingDataModule(train_set=data, val_set=data, replay_ratio=0)
    with pytest.raises(ValueError, match="shots must be an integer >= 1"):
        ForgettingDataModule(train_set=data, val_set=data, shots=0)
    dm = ForgettingDataModule(train_set=data, val_set=data, missing_classes=[9])
    with pytest.raises(ValueError, match=r"missing_classes \[9\] have no training samples"):
        dm.setup("fit")
    dm = ForgettingDataModule(train_set=data, val_set=data)
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="no forgetting task is selected"):
        dm.train_dataloader()


def test_targets_read_from_items_when_absent():
    data = TensorDataset(torch.zeros(3, 2), torch.tensor([2, 0, 1]))
    assert dataset_targets(data) == [2, 0, 1]


def test_seeded_sampler_depends_on_epoch_only():
    sampler = SeededRandomSampler(10, seed=1)
    sampler.set_epoch(2)
    first, second = list(sampler), list(sampler)  # a cycled loader gets a new order on its second pass
    again = SeededRandomSampler(10, seed=1)
    again.set_epoch(2)
    assert list(again) == first and first != second and sorted(first) == list(range(10))


@pytest.mark.parametrize(
    "tasks, error, message",
    [
        ([], ValueError, "tasks is empty"),
        ([[0, 1], []], ValueError, "task 1 is empty"),
        ([[0, 1], [1, 2]], ValueError, "class 1 is in task 0 and again in task 1: tasks overlap"),
        ([[3, 3]], ValueError, r"task 0 lists class\(es\) \[3\] more than once"),
        ([[0, -1]], ValueError, "class id -1; class ids must be >= 0"),
        ([["a"]], TypeError, "class ids must be integers"),
        ("01", TypeError, "tasks must be a list of class-id lists"),
    ],
)
def test_task_validation(tasks, error, message):
    with pytest.raises(error, match=message):
        validate_tasks(tasks)
