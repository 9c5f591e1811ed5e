"""DataModules: real offline data, stratified seeded splits, user folders and tensors, augmentation, errors."""

import logging
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_plugins.modules import (
    DigitsDataModule,
    ImageFolderDataModule,
    LabelledImageDataset,
    MNIST5kDataModule,
    TensorDataModule,
)
from lightning_plugins.modules.data import stratified_split
from lightning_plugins.modules.data.datasets import RandomAffineBatch


def test_stratified_split_keeps_class_balance_and_is_seeded():
    targets = [c for c in range(4) for _ in range(50)]
    train, val, test = stratified_split(targets, (0.6, 0.2, 0.2), seed=3)
    assert sorted(train + val + test) == list(range(200))  # a partition: nothing dropped or repeated
    for part, share in ((train, 30), (val, 10), (test, 10)):
        assert Counter(targets[i] for i in part) == {c: share for c in range(4)}
    assert stratified_split(targets, (0.6, 0.2, 0.2), seed=3) == [train, val, test]
    assert stratified_split(targets, (0.6, 0.2, 0.2), seed=4)[0] != train


def test_stratified_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split([0, 1], (0.5, 0.6), seed=0)


def test_mnist5k_is_the_real_sample_with_500_per_class():
    data = MNIST5kDataModule(val_fraction=0.1, test_fraction=0.2)
    data.setup("fit")
    assert data.num_classes == 10 and data.image_shape == (1, 28, 28)
    sizes = len(data.train_set), len(data.val_set), len(data.test_set)
    assert sizes == (3500, 500, 1000)
    assert Counter(data.test_set.targets) == {c: 100 for c in range(10)}
    raw = data._full().images
    assert raw.min() == 0.0 and raw.max() == 1.0
    # a real digit: mostly background, with some ink
    ink = (raw[0] > 0.5).float().mean()
    assert 0.05 < ink < 0.4


def test_digits_shapes_and_normalization_from_train_split():
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    assert data.image_shape == (1, 8, 8) and len(data._full()) == 1797
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (64, 1, 8, 8) and labels.dtype == torch.long
    train_pixels = torch.stack([data.train_set[i][0] for i in range(len(data.train_set))])
    assert abs(train_pixels.mean().item()) < 1e-4 and abs(train_pixels.std().item() - 1) < 1e-3


def test_dataset_select_keeps_targets_visible():
    images = torch.rand(6, 1, 4, 4)
    dataset = LabelledImageDataset(images, [0, 1, 2, 0, 1, 2])
    subset = dataset.select([1, 4])
    assert subset.targets == [1, 1] and torch.equal(subset[1][0], images[4])
    assert subset.classes == ["0", "1", "2"]


def test_affine_augmentation_moves_pixels_but_keeps_shape():
    torch.manual_seed(0)
    batch = torch.zeros(8, 1, 28, 28)
    batch[:, :, 10:18, 10:18] = 1.0
    augmented = RandomAffineBatch(max_shift=3, max_rotation=15, max_scale=0.1)(batch)
    assert augmented.shape == batch.shape
    assert not torch.allclose(augmented, batch)
    assert augmented.sum(dim=(1, 2, 3)).sub(64).abs().max() < 25  # ink is moved, not created
    assert torch.equal(RandomAffineBatch()(batch), batch)


def test_training_loader_augments_and_evaluation_loader_does_not():
    data = DigitsDataModule(batch_size=1797, val_fraction=0.1, test_fraction=0.1, max_shift=1)
    data.setup("fit")
    torch.manual_seed(0)
    train_batch = next(iter(data.train_dataloader()))[0]
    plain = torch.stack([data.train_set[i][0] for i in range(len(data.train_set))])
    assert train_batch.shape == plain.shape
    assert not any(torch.equal(train_batch[0], image) for image in plain)
    no_augment = DigitsDataModule(batch_size=1797, val_fraction=0.1, test_fraction=0.1)
    no_augment.setup("fit")
    assert any(torch.equal(next(iter(no_augment.train_dataloader()))[0][0], image) for image in plain)
    val_a, val_b = next(iter(data.val_dataloader()))[0], next(iter(data.val_dataloader()))[0]
    assert torch.equal(val_a, val_b)


def test_image_folder_loads_classes_and_logs_ignored_files(tmp_path, caplog):
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (12, 10), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    data = ImageFolderDataModule(str(tmp_path), image_size=8, in_channels=3, val_fraction=0.2, test_fraction=0.2)
    with caplog.at_level(logging.WARNING):
        data.setup("fit")
    assert "ignored 1 files" in caplog.text
    assert data._full().classes == ["cat", "dog"] and data.image_shape == (3, 8, 8)
    assert Counter(data._full().targets) == {0: 5, 1: 5}
    assert len(data.train_set) == 6 and Counter(data.val_set.targets) == {0: 1, 1: 1}


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataModule(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataModule(str(tmp_path)).setup("fit")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        ImageFolderDataModule(str(tmp_path)).setup("fit")


def test_tensor_datamodule_from_tensors_and_file(tmp_path):
    images = torch.randint(0, 256, (40, 8, 8), dtype=torch.uint8)
    labels = torch.arange(40) % 4
    data = TensorDataModule(images, labels, val_fraction=0.25, test_fraction=0.25)
    data.setup("fit")
    assert data.num_classes == 4 and data.image_shape == (1, 8, 8) and len(data.train_set) == 20
    torch.save({"images": images, "labels": labels}, tmp_path / "data.pt")
    from_file = TensorDataModule(str(tmp_path / "data.pt"))
    assert from_file.num_classes == 4
    torch.save([images], tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="'images' and 'labels'"):
        TensorDataModule(str(tmp_path / "bad.pt"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "no training data"),
        ({"max_rotation": -1}, "max_rotation"),
    ],
)
def test_bad_datamodule_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)
