"""FaceDataModule over every source: embedded instance identities, identity folders (also MTCNN-aligned),
InsightFace RecordIO, tensor files, and .bin verification sets, each written by the test in the anchors' layout."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_plugins.modules.face import FaceDataModule
from lightning_plugins.modules.face.data import heldout_pairs, to_model_input
from lightning_plugins.modules.face.embedded import instance_identity_split, load_lfw_subset_faces, make_views
from lightning_plugins.modules.face.formats import write_insightface_record, write_verification_bin


def small_views(identities=4, views=5, size=32):
    images = make_views(load_lfw_subset_faces()[:identities], views, seed=7, image_size=size)
    return (images * 255).round().to(torch.uint8), torch.arange(identities).repeat_interleave(views)


def write_folders(root, images, labels):
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = root / f"person_{int(label):02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:03d}.png")


def write_pairs(path, images):
    pair_images = torch.stack([images[0], images[1], images[0], images[5], images[5], images[6], images[2], images[9]])
    write_verification_bin(path, pair_images, [True, False, True, False], image_format="png")


def test_embedded_split_is_seeded_and_disjoint():
    first, again = instance_identity_split(seed=0), instance_identity_split(seed=0)
    assert torch.equal(first.train[0], again.train[0])
    assert first.train[0].shape == (80 * 40, 3, 32, 32) and first.heldout_val[0].shape == (20 * 10, 3, 32, 32)
    assert set(first.train[1].tolist()) == set(range(80))
    assert not torch.equal(first.val[0], first.test[0])
    assert 0.0 <= float(first.train[0].min()) and float(first.train[0].max()) <= 1.0


def test_heldout_pairs_are_every_same_pair_and_as_many_distinct_different_pairs():
    labels = torch.arange(3).repeat_interleave(4)
    pairs, issame = heldout_pairs(labels, seed=0)
    same = {tuple(p) for p, s in zip(pairs.tolist(), issame.tolist()) if s}
    different = [tuple(p) for p, s in zip(pairs.tolist(), issame.tolist()) if not s]
    assert len(same) == 3 * 6 and len(different) == len(same) == len(set(different))
    assert all(labels[i] == labels[j] for i, j in same) and all(labels[i] != labels[j] for i, j in different)
    assert issame[:4].tolist() == [True, False, True, False]  # alternating: every 10-fold slice has both kinds


def test_embedded_datamodule_gives_identification_and_heldout_pairs():
    data = FaceDataModule(batch_size=16)
    data.setup("fit")
    assert data.num_classes == 80 and data.image_shape == (3, 32, 32)
    assert data.val_loader_names == ["identification", "heldout"]
    identification, pairs = data.val_dataloader()
    images, labels = next(iter(identification))
    assert images.shape == (16, 3, 32, 32) and -1.0 <= images.min() and images.max() <= 1.0
    first, second, issame, index = next(iter(pairs))
    assert first.shape == second.shape == (16, 3, 32, 32) and index.tolist() == list(range(16))
    assert len(data.heldout_pairs["val"]) == 900 * 2
    assert not torch.equal(data.heldout_pairs["val"].images, data.heldout_pairs["test"].images)


def test_identity_folders_with_a_bin_verification_set(tmp_path, caplog):
    images, labels = small_views()
    write_folders(tmp_path / "faces", images, labels)
    (tmp_path / "faces" / "person_00" / "notes.txt").write_text("not an image")
    (tmp_path / "faces" / "empty_person").mkdir()
    write_pairs(tmp_path / "tiny_lfw.bin", images)
    with caplog.at_level(logging.WARNING):
        data = FaceDataModule(str(tmp_path / "faces"), verification=[str(tmp_path / "tiny_lfw.bin")], image_size=32,
                              batch_size=4, val_fraction=0.2, test_fraction=0.2)
        data.setup("fit")
    assert "ignored 1 files" in caplog.text and "empty_person" in caplog.text
    assert data.num_classes == 4 and data.identities == [f"person_{i:02d}" for i in range(4)]
    assert data.val_loader_names == ["identification", "tiny_lfw"]
    assert len(data.train_set) + len(data.val_set) + len(data.test_set) == 20
    image, label = data.train_set[0]
    torch.testing.assert_close(image, to_model_input(images[0], 32))  # PNG is lossless: the same pixels
    first, second, issame, index = next(iter(data.val_dataloader()[1]))
    assert issame.tolist() == [True, False, True, False]
    torch.testing.assert_close(first[1], to_model_input(images[0], 32))


def test_insightface_record_folder_and_tensor_file(tmp_path):
    images, labels = small_views()
    write_insightface_record(tmp_path / "rec", [(img, int(lab)) for img, lab in zip(images, labels)],
                             image_format="png")
    data = FaceDataModule(str(tmp_path / "rec"), image_size=32, batch_size=4)
    data.setup("fit")
    assert data.num_classes == 4
    assert sorted(data.train_set.dataset.targets) == sorted(labels.tolist())
    torch.save({"images": images, "labels": labels}, tmp_path / "faces.pt")
    tensors = FaceDataModule(str(tmp_path / "faces.pt"), image_size=32, batch_size=4)
    tensors.setup("fit")
    assert tensors.num_classes == 4
    batch, _ = next(iter(tensors.train_dataloader()))
    assert batch.shape == (4, 3, 32, 32)


def test_alignment_detects_caches_and_counts_images_without_a_face(tmp_path, caplog):
    pytest.importorskip("facenet_pytorch")
    from skimage import data as samples

    root = tmp_path / "people"
    (root / "astronaut").mkdir(parents=True)
    (root / "coffee").mkdir()
    astronaut = samples.astronaut()
    Image.fromarray(astronaut).save(root / "astronaut" / "a.png")
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(root / "astronaut" / "b.png")
    Image.fromarray(samples.coffee()).save(root / "coffee" / "cup.png")
    with caplog.at_level(logging.WARNING):
        data = FaceDataModule(str(root), image_size=112, align=True, align_cache_dir=str(tmp_path / "cache"),
                              val_fraction=0.0, test_fraction=0.0, batch_size=2)
        data.setup("fit")
    assert "no face in 1 of 3 images" in caplog.text and "cup.png" in caplog.text
    assert len(data.train_set) == 2
    image, label = data.train_set[0]
    assert image.shape == (3, 112, 112) and label == 0
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 3  # the no-face result is cached too


def test_bad_sources_and_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="neither 'lfw_subset'"):
        FaceDataModule(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FaceDataModule(verification=[str(tmp_path / "lfw.bin")])
    with pytest.raises(ValueError, match="align=True applies to identity folders"):
        FaceDataModule(align=True)
    with pytest.raises(ValueError, match="leaves no training data"):
        FaceDataModule(val_fraction=0.5, test_fraction=0.5)
