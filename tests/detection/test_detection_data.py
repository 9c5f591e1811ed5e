"""MNIST scenes (composition, export) and the COCO detection dataset/DataModule, against hand-made references."""

import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_plugins.modules.detection.data import (
    COCODetectionDataModule,
    COCODetectionDataset,
    detection_collate,
)
from lightning_plugins.modules.detection.scenes import (
    digit_splits,
    export_mnist_scenes,
    load_mnist5k,
    make_mnist_scenes,
)

SMALL = {"train": 40, "val": 10, "test": 10}


@pytest.fixture(scope="module")
def full_export(tmp_path_factory):
    """The default export (2,000/200/200 scenes, seed 0), built once for the module."""
    root = tmp_path_factory.mktemp("scenes-full")
    return root, export_mnist_scenes(root)


@pytest.fixture(scope="module")
def train_scenes():
    return make_mnist_scenes("train", 2000, seed=0)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- scenes -------------------------------------------------------------------------------------------------------
def test_export_is_deterministic_per_seed(tmp_path):
    first = export_mnist_scenes(tmp_path / "a", **SMALL, seed=3)
    export_mnist_scenes(tmp_path / "b", **SMALL, seed=3)
    export_mnist_scenes(tmp_path / "c", **SMALL, seed=4)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert len(a) == 3 + 1 + 60  # 3 jsons, manifest, 60 PNGs
    assert a == b
    assert a.keys() == c.keys()
    assert a["train.json"] != c["train.json"]
    assert sum(a[k] != c[k] for k in a if k.endswith(".png")) > 50
    assert first == {s: tmp_path / "a" / f"{s}.json" for s in ("train", "val", "test")}


def test_export_is_skipped_when_present_and_rebuilt_when_settings_change(tmp_path):
    export_mnist_scenes(tmp_path, **SMALL, seed=0)
    png = tmp_path / "images" / "train" / "000001.png"
    stamp = png.stat().st_mtime_ns
    png.write_bytes(b"marker")  # a skipped export leaves it alone
    export_mnist_scenes(tmp_path, **SMALL, seed=0)
    assert png.read_bytes() == b"marker" and png.stat().st_mtime_ns >= stamp
    export_mnist_scenes(tmp_path, train=30, val=10, test=10, seed=0)
    assert png.read_bytes() != b"marker"
    assert len(list((tmp_path / "images" / "train").glob("*.png"))) == 30
    assert json.loads((tmp_path / "manifest.json").read_text())["settings"]["counts"]["train"] == 30


def test_every_box_is_tight_on_ink_and_no_ink_lies_outside_boxes(train_scenes):
    for scene in train_scenes[:300]:
        image = scene.image
        assert image.shape == (128, 128) and image.dtype == np.uint8
        covered = np.zeros_like(image, dtype=bool)
        assert 1 <= len(scene.boxes) <= 4
        for x1, y1, x2, y2 in scene.boxes.tolist():
            assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128
            assert image[y1, x1:x2].any() and image[y2 - 1, x1:x2].any()  # top and bottom rows
            assert image[y1:y2, x1].any() and image[y1:y2, x2 - 1].any()  # left and right columns
            covered[y1:y2, x1:x2] = True
        assert not image[~covered].any()


def test_boxes_never_overlap_and_sizes_follow_the_recipe(train_scenes):
    heights = []
    for scene in train_scenes:
        boxes = scene.boxes.tolist()
        for i, (ax1, ay1, ax2, ay2) in enumerate(boxes):
            heights.append(ay2 - ay1)
            for bx1, by1, bx2, by2 in boxes[i + 1:]:
                assert min(ax2, bx2) <= max(ax1, bx1) or min(ay2, by2) <= max(ay1, by1)
    heights = np.asarray(heights)
    assert heights.min() >= 14 and heights.max() <= 56
    assert 30 < heights.mean() < 42  # uniform 16..56 draws


def test_labels_are_the_source_digits_and_roughly_uniform(train_scenes):
    _, digit_labels = load_mnist5k()
    labels = np.concatenate([s.labels for s in train_scenes])
    digits = np.concatenate([s.digits for s in train_scenes])
    np.testing.assert_array_equal(labels, digit_labels[digits])
    counts = np.bincount(labels, minlength=10)
    assert 2 * len(train_scenes) < counts.sum() < 3 * len(train_scenes)  # 1-4 digits per scene: 2.5 on average
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()


def test_splits_use_disjoint_digits(full_export):
    root, paths = full_export
    used = {}
    for split, path in paths.items():
        coco = json.loads(path.read_text())
        used[split] = {a["source_digit"] for a in coco["annotations"]}
    assert not used["train"] & (used["val"] | used["test"])
    assert not used["val"] & used["test"]
    manifest = json.loads((root / "manifest.json").read_text())
    pools = {split: set(indices) for split, indices in manifest["digit_splits"].items()}
    assert {len(p) for p in pools.values()} == {len(pools["train"]), 250} and len(pools["train"]) == 4500
    for split in used:
        assert used[split] <= pools[split]
    assert pools == {split: set(indices) for split, indices in digit_splits(0).items()}
    # digits are stratified: every split's pool holds every class in equal shares
    _, labels = load_mnist5k()
    assert np.bincount(labels[sorted(pools["test"])], minlength=10).tolist() == [25] * 10


def test_pycocotools_reads_the_export_and_scores_ground_truth_as_perfect(full_export):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    _, paths = full_export
    gt = COCO(str(paths["val"]))
    assert sorted(gt.getCatIds()) == list(range(1, 11))
    assert [gt.loadCats(i)[0]["name"] for i in range(1, 11)] == [str(d) for d in range(10)]
    assert len(gt.getImgIds()) == 200
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                  for a in gt.dataset["annotations"]]
    evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
    evaluator.params.imgIds = gt.getImgIds()[:50]
    evaluator.evaluate()
    evaluator.accumulate()
    assert math.isclose(_summarize(evaluator), 1.0)


def _summarize(evaluator):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.summarize()
    return evaluator.stats[0]


def test_round_trip_through_the_coco_reader(tmp_path):
    module = COCODetectionDataModule(scenes_dir=str(tmp_path), num_train_scenes=40, num_val_scenes=10,
                                     num_test_scenes=10, seed=5)
    module.setup()
    for split, dataset in (("train", module.train_set), ("val", module.val_set), ("test", module.test_set)):
        scenes = make_mnist_scenes(split, len(dataset), seed=5)
        assert len(dataset) == SMALL[split]
        for index, scene in enumerate(scenes):
            annotation = dataset.annotations_of(index)
            boxes, labels = annotation["boxes"], annotation["labels"]
            torch.testing.assert_close(boxes, torch.from_numpy(scene.boxes).float(), rtol=0, atol=0)
            assert labels.tolist() == scene.labels.tolist()
            if index < 10:
                image, target = dataset[index]
                assert image.shape == (3, 128, 128)
                pixels = (image * 255).round().to(torch.uint8)
                assert torch.equal(pixels, torch.from_numpy(scene.image).expand(3, -1, -1))
                assert target["image_id"] == index + 1


def test_default_module_builds_into_the_cache_and_serves_the_batch_contract(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    module = COCODetectionDataModule(batch_size=4, seed=2, num_train_scenes=12, num_val_scenes=6, num_test_scenes=6)
    # known before setup, without building anything
    assert module.num_classes == 10 and module.category_ids == list(range(1, 11))
    assert module.class_names == [str(d) for d in range(10)]
    assert module.category_map() == {"category_ids": list(range(1, 11)), "class_names": [str(d) for d in range(10)]}
    assert not (tmp_path / "lightning-plugins").exists()
    with caplog.at_level(logging.INFO, logger="lightning_plugins.modules.detection.data"):
        module.prepare_data()
        module.setup("fit")
    root = tmp_path / "lightning-plugins" / "mnist-scenes-seed2"
    assert (root / "manifest.json").is_file() and (root / "images" / "val" / "000006.png").is_file()
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "empty images" in r.getMessage()]
    assert len(info) == 3 and "train: 12 images" in info[0] and "0 bad boxes dropped" in info[0]
    for loader, count in ((module.train_dataloader(), 12), (module.val_dataloader(), 6), (module.test_dataloader(), 6)):
        seen = 0
        for images, targets in loader:
            assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) <= 4
            for image, target in zip(images, targets):
                assert image.dtype == torch.float32 and image.shape == (3, 128, 128)
                assert 0 <= image.min() and image.max() <= 1 and image.max() > 0.5
                assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
                assert target["labels"].dtype == torch.int64 and len(target["labels"]) == len(target["boxes"])
                assert int(target["labels"].min()) >= 0 and int(target["labels"].max()) <= 9
                assert isinstance(target["image_id"], int)
                assert target["crowd_boxes"].shape == (0, 4) and target["crowd_labels"].shape == (0,)
            seen += len(images)
        assert seen == count


# -- COCO reader on a hand-written json ----------------------------------------------------------------------------
@pytest.fixture
def tiny_coco(tmp_path):
    """Two images (one empty), gapped category ids 3 and 7, a crowd box and four bad annotations."""
    images = tmp_path / "pictures"
    images.mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(images / "a.png")
    Image.new("L", (20, 10), 128).save(images / "b.png")  # grey: must come back as 3 channels
    coco = {
        "images": [
            {"id": 11, "file_name": "a.png", "height": 30, "width": 40},
            {"id": 22, "file_name": "b.png", "height": 10, "width": 20},
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],  # unsorted on purpose
        "annotations": [
            {"id": 101, "image_id": 11, "category_id": 3, "bbox": [1, 2, 10, 5], "area": 50, "iscrowd": 0},
            {"id": 102, "image_id": 11, "category_id": 7, "bbox": [20, 10, 20.5, 10], "area": 205, "iscrowd": 0},
            {"id": 103, "image_id": 11, "category_id": 7, "bbox": [0, 0, 40, 30], "area": 1200, "iscrowd": 1},
            {"id": 104, "image_id": 11, "category_id": 3, "bbox": [5, 5, 0, 4], "area": 0, "iscrowd": 0},
            {"id": 105, "image_id": 11, "category_id": 7, "bbox": [30, 5, 25, 4], "area": 100, "iscrowd": 0},
            {"id": 106, "image_id": 11, "category_id": 5, "bbox": [2, 2, 4, 4], "area": 16, "iscrowd": 0},
            {"id": 107, "image_id": 11, "category_id": 3, "bbox": [-3, 2, 4, 4], "area": 16, "iscrowd": 0},
        ],
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(coco))
    return path, images


def test_tiny_coco_labels_crowd_bad_boxes_and_empty_image(tiny_coco, caplog):
    path, images = tiny_coco
    with caplog.at_level(logging.WARNING):
        dataset = COCODetectionDataset(path, images)
    assert dataset.category_ids == [3, 7] and dataset.class_names == ["three", "seven"]
    assert len(dataset) == 2 and dataset.num_empty == 1 and dataset.num_crowd == 1
    image, target = dataset[0]
    assert image.shape == (3, 30, 40)
    torch.testing.assert_close(image[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert target["image_id"] == 11
    assert target["labels"].tolist() == [0, 1]  # 3 -> 0, 7 -> 1
    # 102 exceeds the image by 0.5 px: clipped to the border, not dropped
    torch.testing.assert_close(target["boxes"], torch.tensor([[1.0, 2.0, 11.0, 7.0], [20.0, 10.0, 40.0, 20.0]]))
    torch.testing.assert_close(target["crowd_boxes"], torch.tensor([[0.0, 0.0, 40.0, 30.0]]))
    assert target["crowd_labels"].tolist() == [1] and target["crowd_labels"].dtype == torch.int64
    image, target = dataset[1]
    assert image.shape == (3, 10, 20) and torch.allclose(image, torch.full_like(image, 128 / 255))
    assert target["image_id"] == 22 and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert dataset.image_labels() == [{0, 1}, set()]
    boxes, labels = dataset.annotations_of(0)["boxes"], dataset.annotations_of(0)["labels"]
    assert boxes.shape == (2, 4) and labels.tolist() == [0, 1]
    # every bad annotation is reported with the json, its id and its image file, in one warning
    assert sorted(a for a, _, _ in dataset.bad) == [104, 105, 106, 107]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    for needle in ("tiny.json", "4 bad annotations", "annotation 104", "annotation 105", "annotation 106",
                   "annotation 107", "image a.png", "unknown category_id 5"):
        assert needle in warnings[0], needle


def test_bad_box_warning_lists_ten_and_counts_all(tmp_path, caplog):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    annotations = [{"id": 1000 + i, "image_id": 1, "category_id": 1, "bbox": [0, 0, float("nan"), 2], "iscrowd": 0}
                   for i in range(13)]
    path = tmp_path / "many.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.png", "height": 8, "width": 8}],
                                "categories": [{"id": 1, "name": "a"}], "annotations": annotations}))
    with caplog.at_level(logging.WARNING):
        dataset = COCODetectionDataset(path, tmp_path)
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "13 bad annotations" in message and "first 10 listed" in message
    assert "annotation 1009" in message and "annotation 1010" not in message
    assert dataset.num_empty == 1 and len(dataset.bad) == 13


def test_min_box_size_drops_small_boxes(tiny_coco):
    path, images = tiny_coco
    dataset = COCODetectionDataset(path, images, min_box_size=6)
    assert dataset.annotations_of(0)["labels"].tolist() == [1]  # 101 is 5 px high
    assert 101 in [a for a, _, _ in dataset.bad]


def test_module_on_user_coco(tiny_coco, caplog):
    path, images = tiny_coco
    module = COCODetectionDataModule(train_json=str(path), train_images=str(images), val_json=str(path),
                                     val_images=str(images), batch_size=2)
    assert module.num_classes == 2 and module.category_map() == {"category_ids": [3, 7],
                                                                 "class_names": ["three", "seven"]}
    with caplog.at_level(logging.INFO, logger="lightning_plugins.modules.detection.data"):
        module.setup("fit")
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "empty images" in r.getMessage()]
    assert len(info) == 2
    assert "train: 2 images, 7 annotations (2 boxes, 1 crowd), 1 empty images, 4 bad boxes dropped" in info[0]
    images_batch, targets = next(iter(module.val_dataloader()))
    assert [t["image_id"] for t in targets] == [11, 22] and [i.shape[1:] for i in images_batch] == [(30, 40), (10, 20)]
    with pytest.raises(RuntimeError, match="test_json"):
        module.test_dataloader()


def test_module_argument_errors(tiny_coco, tmp_path):
    path, images = tiny_coco
    with pytest.raises(ValueError, match="val_json"):
        COCODetectionDataModule(train_json=str(path), train_images=str(images))
    with pytest.raises(ValueError, match="without train_json"):
        COCODetectionDataModule(val_json=str(path))
    with pytest.raises(FileNotFoundError, match="val_json"):
        COCODetectionDataModule(train_json=str(path), val_json=str(tmp_path / "nope.json"))
    module = COCODetectionDataModule(train_json=str(path), val_json=str(path), val_images=str(images))
    with pytest.raises(FileNotFoundError, match="train_images"):  # images are not next to the json
        module.setup()


def test_collate_keeps_lists():
    batch = [(torch.zeros(3, 4, 5), {"boxes": torch.zeros(0, 4)}), (torch.ones(3, 6, 2), {"boxes": torch.ones(1, 4)})]
    images, targets = detection_collate(batch)
    assert [i.shape for i in images] == [(3, 4, 5), (3, 6, 2)]
    assert targets[1]["boxes"].shape == (1, 4)
